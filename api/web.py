"""The web page at `/`: one static HTML page, its script and stylesheet (api/static/).

The page talks only to this API, with the key the user enters (kept in the
browser session's sessionStorage): no CDN, no build step, nothing fetched from
elsewhere. Its Content-Security-Policy says so to the browser too.
"""

from __future__ import annotations

from flask import Blueprint, current_app, send_from_directory

bp = Blueprint("web", __name__)

# Scripts and styles from this origin only; images also from blob: (fetched with the key, shown by object URL).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@bp.get("/")
def page():
    response = send_from_directory(current_app.static_folder, "index.html", max_age=0)
    response.headers.update(
        {
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
        }
    )
    return response
