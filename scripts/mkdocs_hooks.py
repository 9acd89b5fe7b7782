"""mkdocs hook (mkdocs.yml ``hooks:``): fills ``docs/configuration.md``'s reference from the
configs' own comments at every build (:func:`biasseg.config_reference.reference_markdown`)."""

from biasseg.config_reference import reference_markdown

MARKER = "<!-- configuration reference: generated from configs/ at build time -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "configuration.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/configuration.md lost its marker {MARKER!r}")
        return markdown.replace(MARKER, reference_markdown())
    return markdown
