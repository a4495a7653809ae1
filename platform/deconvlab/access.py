"""Who may do what on a team tracking server: credentials, refusals, and keeping secrets out of the store.

A team server runs MLflow's basic-auth app (``infra/mlflow/``). deconvlab is one of its clients: MLflow reads
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) from the
environment and sends them with every request; deconvlab never stores them. A request the server refuses
(401: no or wrong credentials; 403: no permission on an experiment or registered model) becomes one
:class:`~deconvlab.errors.AccessRefused` naming what is missing, through :func:`refusal` (used by the CLI) or
:func:`refusals_named` (used where the code knows which experiment or model it is writing to).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

from deconvlab.errors import AccessRefused, UserError

USERNAME_VARIABLE, PASSWORD_VARIABLE, TOKEN_VARIABLE = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
DOCS = "infra/mlflow/README.md"
REDACTED = "***"
# scheme://user:PASSWORD@host: the password part of any URL in a logged value.
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)")
# A secret shorter than this is not searched for in logged text (it would match ordinary words).
MIN_SECRET_LENGTH = 6
# What a refused request tried to do, from its endpoint: (endpoint fragment, action, kind of resource).
ACTIONS = (
    ("/runs/create", "create runs in", "experiment"),
    ("/experiments/create", "create", "experiment"),
    ("/runs/", "write runs of", "experiment"),
    ("/experiments/", "change", "experiment"),
    ("/registered-models/create", "create", "registered model"),
    ("/registered-models/alias", "move aliases of", "registered model"),
    ("/registered-models/", "change", "registered model"),
    ("/model-versions/create", "add versions to", "registered model"),
    ("/model-versions/", "change versions of", "registered model"),
)
READS = ("get", "search", "list")  # the last part of an endpoint that only reads
ARTIFACT_PATH = re.compile(r"/mlflow-artifacts/artifacts/(?P<experiment>[^/]+)/(?P<run>[0-9a-fA-F]{32})/")


# -- secrets never written ---------------------------------------------------------------------------------
def secrets() -> list[str]:
    """The credentials of this process (password, token), wherever MLflow reads them from."""
    from mlflow.utils.credentials import read_mlflow_creds

    found = [read_mlflow_creds().password, os.environ.get(TOKEN_VARIABLE)]
    return [s for s in found if s and len(s) >= MIN_SECRET_LENGTH]


def redact(text: str, hidden: list[str] | None = None) -> str:
    """``text`` with URL passwords and this process's MLflow credentials (or ``hidden``) replaced by ``***``."""
    text = URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}", text)
    for secret in secrets() if hidden is None else hidden:
        text = text.replace(secret, REDACTED)
    return text


def check_uri_has_no_password(uri: str) -> str:
    """``uri``, refused when it is an http(s) address carrying a password (it would be logged with every run).

    Raises:
        UserError: ``http://user:password@host`` in ``MLFLOW_TRACKING_URI`` or ``logger.tracking_uri``.
    """
    if uri.startswith(("http://", "https://")) and urlsplit(uri).password is not None:
        raise UserError(f"the tracking URI {redact(uri)} carries a password", "MLFLOW_TRACKING_URI",
                        f"remove it from the URI and export {USERNAME_VARIABLE} and {PASSWORD_VARIABLE} instead "
                        "(deconvlab logs the tracking URI with every run)")
    return uri


# -- refusals ------------------------------------------------------------------------------------------------
def _refused_request(exc: BaseException) -> tuple[int, str, str] | None:
    """``(401 or 403, endpoint or URL, HTTP method or '')`` when ``exc`` is an MLflow server's refusal."""
    code = getattr(exc, "error_code", None)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        endpoint = re.search(r"endpoint (\S+)", str(exc))
        return (401 if code == "UNAUTHENTICATED" else 403), endpoint[1] if endpoint else "", ""
    response = getattr(exc, "response", None)  # requests.HTTPError from artifact uploads and downloads
    status = getattr(response, "status_code", None)
    if status in (401, 403) and getattr(response, "url", None):
        request = getattr(exc, "request", None)
        return status, response.url, getattr(request, "method", "") or ""
    return None


def _find_refused(exc: BaseException | None) -> tuple[int, str, str] | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, UserError):
        found = _refused_request(exc)
        if found:
            return found
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _action(endpoint: str, method: str) -> tuple[str, str]:
    """``(what the request tried, the kind of resource)``, e.g. ``("add versions to", "registered model")``."""
    if ARTIFACT_PATH.search(endpoint):
        return ("read artifacts of" if method.upper() == "GET" else "write artifacts to"), "experiment"
    path = urlsplit(endpoint).path.rstrip("/")
    for fragment, action, kind in ACTIONS:
        if fragment in f"{path}/":
            return ("read" if path.rsplit("/", 1)[-1].startswith(READS) else action), kind
    return "use", "resource"


def _artifact_experiment(url: str) -> str | None:
    """The experiment an artifact URL belongs to, by name when the server tells it."""
    match = ARTIFACT_PATH.search(url)
    if match is None:
        return None
    from mlflow.tracking import MlflowClient

    parts = urlsplit(url)
    try:
        name = MlflowClient(f"{parts.scheme}://{parts.netloc}").get_experiment(match["experiment"]).name
    except Exception:  # noqa: BLE001 - only a nicer name; the id says the same
        return f"experiment {match['experiment']} (run {match['run']})"
    return f"experiment {name!r} (run {match['run']})"


def _server(tracking_uri: str | None, endpoint: str) -> str:
    if endpoint.startswith(("http://", "https://")):
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{parts.netloc}"
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""


def unauthenticated(server: str) -> AccessRefused:
    """The error for a server that did not accept this process's login (HTTP 401)."""
    server = f"the MLflow server {server}" if server else "the MLflow tracking server"
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if creds.username and creds.password:
        return AccessRefused(f"{server} rejected the login of user {creds.username!r} "
                             "(wrong password, or no such user)", PASSWORD_VARIABLE,
                             f"check the password, or ask an admin of the server for an account ({DOCS})")
    if os.environ.get(TOKEN_VARIABLE):
        return AccessRefused(f"{server} did not accept the token", TOKEN_VARIABLE,
                             f"use {USERNAME_VARIABLE} and {PASSWORD_VARIABLE} with this server ({DOCS})")
    missing = PASSWORD_VARIABLE if creds.username else f"{USERNAME_VARIABLE} / {PASSWORD_VARIABLE}"
    return AccessRefused(f"{server} requires a login and no credentials are set", missing,
                         f"export {USERNAME_VARIABLE} and {PASSWORD_VARIABLE} with your account on it ({DOCS})")


def refusal(exc: BaseException, resource: str | None = None, tracking_uri: str | None = None) -> UserError | None:
    """The user error for a request the tracking server refused (401/403) anywhere in ``exc``'s chain.

    Args:
        exc: any exception; an MLflow ``RestException`` / ``MlflowException`` or a ``requests.HTTPError``.
        resource: what was being written, e.g. ``"experiment 'sweep-quickstart'"``; guessed from the
            endpoint when None.
        tracking_uri: the server, for the message.

    Returns:
        An :class:`~deconvlab.errors.AccessRefused`, or None when ``exc`` is not a refusal (or is already a
        user error).
    """
    found = _find_refused(exc)
    if found is None:
        return None
    status, endpoint, method = found
    server = _server(tracking_uri, endpoint)
    if status == 401:
        return unauthenticated(server)
    action, kind = _action(endpoint, method)
    resource = resource or _artifact_experiment(endpoint) or f"the {kind} (refused: {urlsplit(endpoint).path})"
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username or "(anonymous)"
    role = "the release role" if kind == "registered model" else "the trainers role"
    fix = (f"ask an admin of the server for READ on it ({DOCS})" if action.startswith("read")
           else f"ask an admin of the server for EDIT on it (e.g. {role}: {DOCS})")
    return AccessRefused(f"MLflow user {user!r} has no permission to {action} {resource}",
                         f"{USERNAME_VARIABLE}={user}" + (f" on {server}" if server else ""), fix)


@contextlib.contextmanager
def refusals_named(resource: str, tracking_uri: str | None = None) -> Iterator[None]:
    """Turn a refusal by the tracking server inside the block into an AccessRefused naming ``resource``."""
    try:
        yield
    except Exception as exc:
        refused = refusal(exc, resource, tracking_uri)
        if refused is None:
            raise
        raise refused from exc


def check_credentials(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any work, when an http(s) tracking server refuses this process's login.

    Raises:
        AccessRefused: the server answered 401 (anonymous, unknown user or wrong password).
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(tracking_uri), "/api/2.0/mlflow/experiments/search",
                                "GET", max_retries=0, timeout=timeout_s, params={"max_results": 1})
    except Exception:  # noqa: BLE001 - reachability is checked separately; MLflow reports the rest
        return
    if response.status_code == 401:
        raise unauthenticated(tracking_uri)
