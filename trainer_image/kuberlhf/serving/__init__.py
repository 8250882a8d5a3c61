"""Chat with a trained actor: an OpenAI-compatible HTTP server (`kuberlhf serve`), a terminal REPL
(`kuberlhf chat`) and a small web page. Importing this package stays light: torch and transformers load only
inside :mod:`kuberlhf.serving.engine`."""
