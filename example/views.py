"""Pages of the example site: the lobby, and a room with its live members."""

from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from channels_presence import validation
from channels_presence.models import Room

#: Rooms the lobby always offers, present or not.
SUGGESTED_ROOMS = ("lobby", "kitchen", "garden")


def lobby(request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
    """The rooms with people in them, with how many, and a way into any room."""
    rooms = Room.objects.annotate(
        users=Count("presence__user", distinct=True),
        visitors=Count("presence", filter=Q(presence__user__isnull=True)),
    ).order_by("channel_name")
    listed = [
        {"name": room.channel_name, "users": room.users, "visitors": room.visitors}
        for room in rooms
    ]
    names = {room["name"] for room in listed}
    listed += [
        {"name": name, "users": 0, "visitors": 0}
        for name in SUGGESTED_ROOMS
        if name not in names
    ]
    listed.sort(key=lambda room: (-(room["users"] + room["visitors"]), room["name"]))
    context = {"rooms": listed, "error": error}
    return render(request, "example/lobby.html", context, status=status)


def go_to_room(request: HttpRequest) -> HttpResponse:
    """The lobby's form: go to the room it names, or say what is wrong with it."""
    name = request.GET.get("name", "").strip()
    try:
        validation.room_name(name)
    except (TypeError, ValueError) as error:
        return lobby(request, error=_reason(error, name), status=400)
    return redirect("room", room=name)


def room(request: HttpRequest, room: str) -> HttpResponse:
    """A room: who is here now (kept live by presence.js), and a chat."""
    try:
        validation.room_name(room)
    except (TypeError, ValueError) as error:
        raise Http404(_reason(error, room)) from error
    found = Room.objects.filter(channel_name=room).first()
    context = {
        "room": room,
        "users": list(found.get_users().order_by("username")) if found else [],
        "anonymous": found.get_anonymous_count() if found else 0,
    }
    return render(request, "example/room.html", context)


def _reason(error: Exception, name: str) -> str:
    if not name:
        return "Type the name of a room."
    return str(error)
