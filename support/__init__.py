"""Support code shared by tests/ and bench/ (neither imports the other; both import this).

    bundled        the bundled model store: its path, model name, and the version served from it
    server         a real `uvicorn app.main:app` (or gunicorn) on a free loopback port
    fashion_mnist  Fashion-MNIST test images as arrays and PNG bytes
    fake_store     a tiny valid model-store version built with onnx.helper (no torch, no training)
    loadgen        load generators: wrk with a multipart Lua script, bursts, client pools
    soak_scenarios load, overload, hot reload and SIGTERM scenarios against a real server

Installed with the project (pyproject.toml), so `python bench/x.py` and pytest import it alike.
"""
