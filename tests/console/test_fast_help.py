"""--help from the rendered-text cache is the parser's own help, keyed so that a stale text is never shown."""

from __future__ import annotations

from trainer.console import fast_help
from trainer.merge import build_parser


def test_the_cached_help_is_the_parsers_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    first = fast_help.rendered_help("trainer/merge.py", "trainer.merge:build_parser")
    assert first == build_parser().format_help()
    [cached] = (tmp_path / "help").iterdir()
    cached.write_text("from the cache")
    assert fast_help.rendered_help("trainer/merge.py", "trainer.merge:build_parser") == "from the cache"
    monkeypatch.setenv("COLUMNS", "80")  # another width (like another version or source) is another key
    assert fast_help.rendered_help("trainer/merge.py", "trainer.merge:build_parser") == build_parser().format_help()


def test_only_a_bare_help_is_served():
    assert fast_help.asks_for_help_only(["--help"]) and fast_help.asks_for_help_only(["-h"])
    assert not fast_help.asks_for_help_only(["recipes/tiny_tang.yaml", "--help"])  # a recipe changes the defaults
