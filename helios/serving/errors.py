"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the HTTP status that says whose fault.

    python -c "from helios.serving.errors import error_body; print(error_body(429, 'busy', None, 'queue_full'))"

4xx: the request's fault or the server's refusal to take it now (413 body too large, 429 queue full, both with a
clear message); 5xx: a true server fault (500) or shutting down (503). 429 and 503 carry Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from helios.serving.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """Raised by handlers; answered by the app's exception handler as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                                         param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)
