"""The x2edit editing app (``x2edit app``): a Gradio page over the public APIs of ``x2edit`` and ``retrieval``.

``x2edit.app.handlers`` holds what the app does in plain Python (no Gradio import: tested directly);
``x2edit.app.ui`` lays out the page and serves it; ``x2edit.app.examples`` renders the Shape World examples.
"""
