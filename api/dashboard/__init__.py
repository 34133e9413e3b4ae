"""The operator dashboard at /dashboard: server-rendered pages (Jinja2) refreshed by htmx polling.

routes.py: HTTP (login, page, panels, actions); session.py: the signed session cookie and CSRF
tokens; views.py: what each panel shows; reporting.py: its reads of the reporting tables;
templates/ and static/ (htmx, vendored unmodified, see static/htmx.LICENSE). No build step.
"""

from api.dashboard.routes import router

__all__ = ["router"]
