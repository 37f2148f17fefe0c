from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import render


# --8<-- [start:whoami]
def whoami(request):
    """What the gate asks on every (uncached) request: 401 when signed out — never a redirect,
    which the gate would read as "auth unavailable" — and the user as JSON otherwise."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "not signed in"}, status=401)
    u = request.user
    resp = JsonResponse({"user": {"id": u.pk, "name": u.get_full_name() or u.get_username(), "email": u.email}})
    resp["Cache-Control"] = "private, max-age=30"  # the gate may cache this decision for 30 s
    return resp
# --8<-- [end:whoami]


@login_required  # belt and braces: the gate already sent signed-out browsers to the login page
def dashboard(request):
    # --8<-- [start:identity]
    identity = {
        "id": request.headers.get("X-Auth-Request-User"),
        "name": request.headers.get("X-Auth-Request-Name"),
        "email": request.headers.get("X-Auth-Request-Email"),
    }
    # --8<-- [end:identity]
    return render(request, "dashboard.html", {"identity": identity})


def me(request):
    """A background API call: the identity the gate verified."""
    return JsonResponse({"id": request.headers.get("X-Auth-Request-User")})
