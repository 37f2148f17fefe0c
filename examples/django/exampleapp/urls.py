from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

urlpatterns = [
    # --8<-- [start:urls]
    path("auth/whoami/", views.whoami),  # the gate's django preset asks here
    # --8<-- [end:urls]
    path("accounts/login/", auth_views.LoginView.as_view()),
    path("accounts/logout/", auth_views.LogoutView.as_view()),
    path("dashboard/", views.dashboard),
    path("api/me", views.me),
]
