"""The presence_changed signal, as 1.0.0 sent it."""

from django.dispatch import Signal

# Sent after commit, once for each real change of a room's presences.
#   sender:      the Room class
#   room:        the Room instance
#   added:       the Presence that joined (or whose user changed), else None
#   removed:     the Presence that left, with its pk intact, else None
#   bulk_change: True when a prune removed several presences at once
# Receivers must accept **kwargs: later versions may send more keywords.
presence_changed = Signal()
