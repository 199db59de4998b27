"""Pushing the dashboards to a Grafana with grafana-client: the folder first
(created once, found by its stable uid after), then each dashboard with
``overwrite`` so a re-push replaces the same uid instead of copying it."""

from __future__ import annotations

from typing import Any

from dashboards.catalog import FOLDER_TITLE, FOLDER_UID
from quotameter.errors import QuotameterError

TIMEOUT_S = 15.0


class GrafanaPushError(QuotameterError):
    """Grafana refused the push or could not be reached. The message names the
    step, Grafana's answer and what usually fixes it."""


_HINTS = {
    401: "the token is missing, wrong or expired: create a service-account token (Editor role) and pass --token",
    403: "the token's service account may not write here: give it the Editor role on the folder",
    404: "is --url the Grafana base URL (e.g. http://grafana:3000), with its sub-path if it has one?",
    412: "a dashboard with the same name or uid changed in between (version mismatch): push again",
}


def _explain(step: str, url: str, exc: Exception) -> GrafanaPushError:
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    message = response.get("message") if isinstance(response, dict) else (response or str(exc))
    if status is None:
        return GrafanaPushError(f"cannot reach Grafana at {url} while {step}: {exc}")
    hint = _HINTS.get(status, "")
    return GrafanaPushError(
        f"Grafana at {url} answered {status} while {step}: {message}" + (f" — {hint}" if hint else "")
    )


def push_dashboards(url: str, token: str, dashboards: dict[str, dict[str, Any]]) -> list[str]:
    """Push every dashboard into the quotameter folder; the URLs Grafana gave them."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url, credential=token, timeout=TIMEOUT_S)
    try:
        return _push(api, url, dashboards, GrafanaClientError)
    finally:
        api.client.s.close()  # its HTTP session (pooled sockets)


def _push(api: Any, url: str, dashboards: dict[str, dict[str, Any]], client_error: type[Exception]) -> list[str]:
    try:
        try:
            api.folder.get_folder(FOLDER_UID)
        except client_error as exc:
            if getattr(exc, "status_code", None) != 404:
                raise
            api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
    except Exception as exc:  # grafana-client's errors, and niquests' connection errors
        raise _explain(f"ensuring folder {FOLDER_UID!r}", url, exc) from None
    urls = []
    for uid, document in dashboards.items():
        body = {"dashboard": {**document, "id": None}, "folderUid": FOLDER_UID, "overwrite": True,
                "message": "quotameter dashboards push"}
        try:
            answer = api.dashboard.update_dashboard(body)
        except Exception as exc:
            raise _explain(f"saving dashboard {uid!r}", url, exc) from None
        urls.append(f"{url.rstrip('/')}{answer.get('url', '')}" if isinstance(answer, dict) else uid)
    return urls
