"""URLs of the example site: the lobby, the rooms, log-in and log-out, the admin."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from example import views

urlpatterns = [
    path("", views.lobby, name="lobby"),
    path("rooms/", views.go_to_room, name="go-to-room"),
    path("rooms/<str:room>/", views.room, name="room"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]
