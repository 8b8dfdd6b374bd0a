"""When no HTTP answer came back: what the transport error means for a segmentation request.

httpx says ``[Errno 111] Connection refused`` or ``timed out``; a user needs to know which
address was tried, whether the service is down, unnamed, busy or crashed mid-request, and what
to do. :func:`no_answer` turns any ``httpx.TransportError`` into a code and such an explanation;
:class:`mlbench.ServiceClient` raises it as a :class:`~mlbench.client.results.ServiceError` with
``status`` 0 (no HTTP status: nothing answered).
"""

from __future__ import annotations

import re

__all__ = ["no_answer"]

_DNS = re.compile(r"Name or service not known|nodename nor servname|getaddrinfo failed|Temporary failure in name "
                  r"resolution|No address associated|Errno -[235]\b|Errno 1100[14]\b", re.I)
_TLS = re.compile(r"SSL|certificate|TLS", re.I)
_REFUSED = re.compile(r"Connection refused|Errno 111\b|Errno 61\b|WinError 10061", re.I)


def no_answer(exc: Exception, url: str, timeout: float) -> tuple[str, str]:
    """``(code, explanation)`` of a request to ``url`` that got no answer because of ``exc`` (an
    ``httpx.TransportError``); ``timeout`` is the client's, in seconds."""
    import httpx

    text = str(exc) or type(exc).__name__
    host = str(getattr(getattr(exc, "request", None), "url", "") or url)
    said = f"({type(exc).__name__}: {text[:160]})"
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect_timeout", (f"no connection to {host} within {timeout:g} s {said}: the host does not answer "
                                   "(down, a firewall dropping packets, or a wrong address). Check the URL and that "
                                   "the service's port is reachable from here")
    if isinstance(exc, httpx.TimeoutException):
        return "client_timeout", (f"{host} accepted the request but sent no answer within this client's timeout of "
                                  f"{timeout:g} s {said}: the service may still be working on it (a large image, "
                                  "a cold start loading the model, a long queue). Raise timeout= "
                                  "(mb.ServiceClient(url, timeout=300)), send a smaller image, or check "
                                  "/api/v1/status for the queue")
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection_lost", (f"{host} closed the connection without an answer {said}: the worker handling "
                                   "the request died mid-request, most often killed for memory (the OOM killer, "
                                   "exit code 137) or by a proxy or gunicorn timeout. Look at the service's log "
                                   "(mb.triage(log)) and the image's size (mb.estimate_memory)")
    if _DNS.search(text):
        return "name_not_resolved", (f"the host name of {url} does not resolve {said}: a typo, or a Docker Compose "
                                     "service name used from outside its network (use localhost and the "
                                     "published port there)")
    if _TLS.search(text):
        return "tls_error", (f"the TLS handshake with {url} failed {said}: use http:// for a service that does not "
                             "speak TLS, or pass the CA bundle that signed its certificate")
    if _REFUSED.search(text):
        return "connection_refused", (f"nothing is listening at {url} {said}: start the service (mlbench serve, or "
                                      "its container), wait until it has loaded its models (GET /readyz), and check "
                                      "the host and port (from another container, the service's name instead of "
                                      "localhost)")
    return "no_answer", (f"no answer from {url} {said}: check the URL, that the service runs, and the network "
                         "between here and it")
