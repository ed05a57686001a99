"""`unclip serve`: OpenAI's Images API and a page at `/`, over one engine on one worker thread.

    api.py     the API's fields mapped onto unclip's requests, results onto OpenAI's responses (no web framework)
    worker.py  the engine's thread and its bounded queue; cancellation between sampler steps
    store.py   images kept an hour for `url` responses (and the answers of kept jobs), in memory
    app.py     the Starlette app: `create_app(engine, settings)`
    server.py  uvicorn: binding, stop signals, a server in a thread for tests and benchmarks
    page.html  the page: plain HTML and JavaScript, nothing fetched from elsewhere

Needs the `serve` extra (`pip install 'unclip-cli[serve]'`: starlette, uvicorn, python-multipart).
"""
