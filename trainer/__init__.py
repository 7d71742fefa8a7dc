"""The fine-tuning trainer package.

Importing it attaches the filters of :mod:`trainer.console.noise` first, before any entry point imports the
libraries, some of which print known-harmless messages at import time.
"""

from trainer.console.noise import silence_known_noise

silence_known_noise()
