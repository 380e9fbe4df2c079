"""Pages of the example site: the lobby, and a room with its live members."""

from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from channels_presence import validation
from channels_presence.models import Room

#: Rooms the lobby always offers, present or not.
SUGGESTED_ROOMS = ("lobby", "kitchen", "garden")


def lobby(request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
    """The rooms with people in them, with how many, and a way into any room.

    The counts are each room's own (``Room.objects.occupied()``): one row per
    room, however many are in it.
    """
    occupied = [
        (room.channel_name, room.users, room.visitors)
        for room in Room.objects.occupied()
    ]
    names = {name for name, _, _ in occupied}
    empty = [(name, 0, 0) for name in SUGGESTED_ROOMS if name not in names]
    listed = [
        {"name": name, "users": users, "visitors": visitors}
        for name, users, visitors in sorted(
            occupied + empty, key=lambda room: (-(room[1] + room[2]), room[0])
        )
    ]
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
    # Each user with ``tabs``, their sockets here: get_users() filters on this
    # room's presences, so the count over that join counts only those.
    users = found.get_users().annotate(tabs=Count("presence")) if found else None
    # The counts are the room's own: one row, kept with its presences.
    counts = Room.objects.counts(room)
    context = {
        "room": room,
        "users": list(users.order_by("username")) if users is not None else [],
        "counts": counts,
        # Visitors are counted per browser session, as presence.js shows them.
        "anonymous": counts.visitors,
        "sockets": counts.sockets,
    }
    return render(request, "example/room.html", context)


def _reason(error: Exception, name: str) -> str:
    if not name:
        return "Type the name of a room."
    return str(error)
