"""`python -m app`: run uvicorn with DSPHERE_HOST / DSPHERE_PORT / DSPHERE_LOG_LEVEL."""

from __future__ import annotations

import uvicorn

from app.settings import SettingsError, load_settings


def main() -> None:
    try:
        s = load_settings()
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None
    uvicorn.run("app.main:app", host=s.host, port=s.port, log_level=s.log_level, timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
