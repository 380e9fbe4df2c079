"""The signals: ``presence_changed``, as 1.0.0 sent it, and user-level transitions."""

from django.dispatch import Signal

# Sent after commit, once for each real change of a room's presences.
#   sender:      the Room class
#   room:        the Room instance
#   added:       the Presence that joined (or whose user changed), else None
#   removed:     the Presence that left, with its pk intact, else None
#   bulk_change: True when a prune removed several presences at once
# Receivers must accept **kwargs: later versions may send more keywords.
presence_changed = Signal()

# Sent after commit, once, when a member key's first socket in a room is
# applied: a user (or a visitor's session) arrived.
#   sender: the Room class
#   room:   the Room instance
#   user:   the user, or None for an anonymous visitor
#   key:    the member key ("u:<pk>" or "v:<digest>"), as frames name it
user_joined_room = Signal()

# Sent after commit, once, when a member key's last socket in a room goes.
#   sender: the Room class
#   room:   the Room instance
#   user:   the user, or None for an anonymous visitor; for "user_deleted",
#           the user as it was (its row is gone)
#   key:    the member key
#   reason: why its last socket went: "left", "expired", "server_lost",
#           "removed" or "user_deleted"
user_left_room = Signal()
