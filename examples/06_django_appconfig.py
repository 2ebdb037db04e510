"""Django: install the plugin in AppConfig.ready(), served by gunicorn; SIGTERM loses nothing."""

# Run it: pip install django gunicorn && python examples/06_django_appconfig.py
# Serve it: gunicorn --chdir examples 06_django_appconfig:application
# Expected output (the demo serves it under gunicorn against a fake ODP server, then sends SIGTERM):
#   sent 40, ODP received 40 events ({'request': 40}), lost 0, duplicated 0, 1 worker process(es),
#   first half delivered while running: True, server exit code 0
# A one-file Django project; in yours, OdpConfig goes in your app's apps.py and the client is
# reached as django.apps.apps.get_app_config("odp").optimizely.

from __future__ import annotations

import os
import sys

from django.apps import AppConfig, apps
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path


class OdpConfig(AppConfig):
    name = __name__
    label = "odp"

    def ready(self) -> None:
        # ready() runs once per process when Django starts (runserver, gunicorn and uWSGI workers,
        # manage.py commands): the place to build the client and install the plugin on it.
        from _demo import optimizely_client

        import optimizely_odp_ext

        self.optimizely = optimizely_client()
        optimizely_odp_ext.install(self.optimizely)


def ready_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


def event_view(request: HttpRequest) -> HttpResponse:
    client = apps.get_app_config("odp").optimizely  # type: ignore[attr-defined]
    client.send_odp_event("request", {"fs_user_id": "u1"}, data={"idempotence_id": request.GET["id"]})
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("", ready_view), path("event", event_view)]

if not settings.configured:
    settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["127.0.0.1"], INSTALLED_APPS=[f"{__name__}.OdpConfig"],
                       SECRET_KEY="demo-only", DEBUG=False)

if __name__ == "__main__":
    import _demo

    port = _demo.free_port()
    served = _demo.serve([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                          "06_django_appconfig:application"], port)
    sys.exit(_demo.report(served, {"request": 40}))
else:  # wsgi.py in a regular project
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
