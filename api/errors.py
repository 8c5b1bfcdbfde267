"""Every error leaves the API as JSON `{"error": "<message>"}` with its status:
never an HTML page, never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify, request
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a client waits before retrying when the database is away


class ApiError(Exception):
    """An error the client should read: raise ApiError(404, "job not found")."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict | None = None):
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _database_unavailable(err: Exception) -> bool:
    """Connection refused or lost, pool exhausted, SQLite locked: worth a retry."""
    if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
        return True
    unavailable = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)
    return isinstance(err, unavailable)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(err: ApiError):
        return error_response(err.status, err.message, err.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(err: RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and limit is not None and request.content_length > limit:
            message = f"request is {request.content_length} bytes, above the limit of {limit} bytes"
        else:
            message = "request too large: over the size limit or too many form parts"
        return error_response(413, message)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        # Keep headers such as Allow (405); the body becomes JSON.
        headers = {k: v for k, v in err.get_headers() if k.lower() != "content-type"}
        message = (err.description or err.name) if err.code != 404 else "not found"
        return error_response(err.code or 500, message, headers)

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        if _database_unavailable(err):
            log.warning("database unavailable: %s", err)
            return error_response(503, "database unavailable, retry later", {"Retry-After": str(RETRY_AFTER_S)})
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")
