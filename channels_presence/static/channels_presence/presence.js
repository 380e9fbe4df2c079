/*
 * channels_presence browser client: who is in a room, over a websocket.
 *
 * Plain JavaScript, no dependencies. Include it with
 *
 *     {% load static channels_presence %}
 *     <script src="{% static 'channels_presence/presence.js' %}"></script>
 *
 * and connect to a consumer that uses PresenceConsumerMixin:
 *
 *     const socket = ChannelsPresence.connect("/ws/rooms/lobby/", {
 *       heartbeatInterval: {% presence_heartbeat_interval %},
 *       rooms: ["lobby"],                          // the rooms this socket joins
 *       onMembers(list, counts, room) { ... },     // the simple case, see below
 *       onSync(members, counts, room) { ... },     // after every state or diff
 *       onJoin(key, member, newMetas, room) { ... },  // a key came: absent -> present
 *       onLeave(key, member, leftMetas, room) { ... }, // a key went: present -> absent
 *       onError(frame) { ... },                    // presence.error frames, below
 *       onMessage(data) { ... },                   // your own messages
 *       onStatus(status) { ... },  // "connecting", "open", "reconnecting", "closed"
 *     });
 *     socket.members("lobby");   // {key: member}, null when unknown or unlisted
 *     socket.version("lobby");   // the room's version, null before its first state
 *     socket.send({message: "hello"});
 *     socket.close();
 *
 * What the callbacks get (wire protocol 2, DESIGN.md):
 *
 *   members  {key: member}: "u:<pk>" for a user, "v:<32 hex>" for an anonymous
 *            visitor (one per browser session per room); null while the room is
 *            too large to be listed (it then sends counts only).
 *   member   {user: {id, username, ...} or null, metas: [meta, ...]}, one meta per
 *            socket (tab) of that key, ordered by (joined_at, ref).
 *   meta     {ref: "r:<32 hex>", joined_at: epoch seconds, meta: {...}}; a meta in
 *            onLeave's leftMetas also has its reason when the server gave one:
 *            "left", "expired", "server_lost", "removed" or "user_deleted".
 *   counts   {users, visitors, sockets}: the room's totals.
 *   list     onMembers' first argument: [{key, user, metas}, ...] ordered by each
 *            key's earliest joined_at, then key; null while the room is unlisted.
 *
 * onSync and onMembers are called after every state or diff applied; onJoin
 * and onLeave before them, for each key that came or went in it (a user's
 * second tab is no join, closing one of two is no leave). The first state of
 * a room joins every key in it. When a room turns unlisted or listed again,
 * nobody is said to join or leave: onSync gets null, then the full map.
 * Treat what the callbacks get as read-only. A callback that throws stops
 * nothing: its error is thrown again from a timer of its own.
 *
 * How a room's view is kept (the reducer, also exported as createView()):
 * states and diffs carry the room's version; a diff from F to V applies to a
 * view at v when F <= v < V; older diffs are dropped, later ones kept until
 * the versions between arrive. The client asks the server for a fresh state
 * ({"type": "presence.sync", "room": R}, at most once a second per room)
 * when such a gap lasts 1 s, when a presence.version beacon is ahead of it
 * for 1 s, when a room named in `rooms` has no state 2 s after the socket
 * opened, and 0-2 s (at random) after a listed diff reaches a view whose
 * members are null.
 *
 * Errors (onError gets the whole frame: {type: "presence.error", error, room,
 * message}):
 *   bad_room        the socket's room name is one Channels cannot use; the
 *                   server then closes it with code 4400
 *   forbidden       can_join refused `room`; the socket stays open in its other
 *                   rooms, unless the consumer sets close_on_refusal: code 4403
 *   too_many_rooms  more rooms than the server allows; closed with code 4429
 *   unavailable     the server could not join `room` for now (its database or
 *                   channel layer is down); it joins at the socket's next
 *                   message, the heartbeat included
 *   not_in_room     a sync named a room this socket is not in
 * A socket closed with 4400, 4403 or 4429 is not opened again: the same
 * request would be refused again. onStatus then gets "closed". One closed with
 * 4503 (the server's channel layer is down: try again later), as one closed
 * any other way, is opened again after the backoff below.
 *
 * It also sends the heartbeat ("heartbeat", as JSON) every heartbeatInterval
 * seconds; reconnects after a lost connection with exponential backoff and
 * full jitter (minDelay * 2^attempt seconds at most, capped at maxDelay);
 * and, when the server says a prune dropped the socket (presence.expired),
 * forgets the room's view and sends a heartbeat 1-2 x rejoinDelay seconds
 * later, at which the mixin joins the room again and sends a new state.
 * After presence.expired or a reconnection, members(room) and version(room)
 * are null until the room's next state; its callbacks then report what
 * changed since the last members they reported, not everyone joining again.
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module.exports) {
    module.exports = api;
  } else {
    root.ChannelsPresence = api;
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var HEARTBEAT = JSON.stringify("heartbeat");
  // The close codes of a refusal: a bad room name, can_join's refusal with
  // close_on_refusal, too many rooms.
  var REFUSED = [4400, 4403, 4429];
  // Seconds a connection must stay open before reconnections back off from
  // the start again.
  var STABLE_AFTER = 10;
  // Milliseconds: the protocol's waits (DESIGN.md, "The client").
  var GAP_WAIT = 1000; // a gap in the versions, before syncing
  var BEACON_WAIT = 1000; // a presence.version ahead of the view, before syncing
  var STATE_WAIT = 2000; // no state since the socket opened (or rejoined)
  var UNLISTED_WAIT = 2000; // at most, at random: a listed diff on null members
  var SYNC_INTERVAL = 1000; // between two syncs of one room, at least
  var noop = function () {};
  var DEFAULTS = {
    heartbeatInterval: 15, // seconds; the server's CHANNELS_PRESENCE_TOUCH_INTERVAL
    minDelay: 1, // seconds before the first reconnection, at most
    maxDelay: 30, // seconds between reconnections, at most
    rejoinDelay: 1, // seconds, at least, before joining again after presence.expired
    rooms: [],
    onSync: noop,
    onJoin: noop,
    onLeave: noop,
    onMembers: noop,
    onError: noop,
    onMessage: noop,
    onStatus: noop,
  };
  var hasOwn = Object.prototype.hasOwnProperty;

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function keys(object) {
    return Object.keys(object).sort();
  }

  function byJoinedAt(a, b) {
    if (a.joined_at !== b.joined_at) {
      return a.joined_at < b.joined_at ? -1 : 1;
    }
    return a.ref < b.ref ? -1 : a.ref > b.ref ? 1 : 0;
  }

  /* A member as the view keeps it: its own metas array, in protocol order. */
  function member(user, metas) {
    return { user: user === undefined ? null : user, metas: metas.slice().sort(byJoinedAt) };
  }

  function membersOf(frameMembers) {
    var members = {};
    keys(frameMembers).forEach(function (key) {
      var found = frameMembers[key];
      if (isObject(found) && Array.isArray(found.metas) && found.metas.length) {
        members[key] = member(found.user, found.metas);
      }
    });
    return members;
  }

  /*
   * `members` ({key: member}) as a list of {key, user, metas}, ordered by each
   * key's earliest joined_at, then by key; null stays null.
   */
  function memberList(members) {
    if (!members) {
      return null;
    }
    return Object.keys(members)
      .map(function (key) {
        return { key: key, user: members[key].user, metas: members[key].metas };
      })
      .sort(function (a, b) {
        var first = a.metas[0].joined_at;
        var second = b.metas[0].joined_at;
        if (first !== second) {
          return first < second ? -1 : 1;
        }
        return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
      });
  }

  /*
   * The view of one room, reduced from its presence.state and presence.diff
   * frames exactly as DESIGN.md's "The client" says; no sockets, no timers.
   *
   *   view.applyState(frame)   a presence.state; returns the changes: the
   *                            state's, then those of the kept diffs it made
   *                            applicable ([] when it was older than the view)
   *   view.applyDiff(frame)    a presence.diff; returns the changes: its own and
   *                            the kept diffs' it made applicable ([] when it
   *                            was dropped or kept)
   *   view.applyVersion(frame) a presence.version beacon; returns view.behind
   *   view.receive(frame)      any of those, or presence.expired (reset)
   *   view.reset()             presence.expired or a new socket: forget the view
   *
   * A change is {type: "state" or "diff", version, members, counts, joins,
   * leaves}, with joins [{key, member, metas}] (the key's new metas) and leaves
   * [{key, member, metas}] (the key as it was; the metas it lost, with their
   * reason when a diff gave one).
   *
   * Read-only: version, members and counts, null before the first state and
   * after reset() (members also while unlisted); gap, whether diffs are kept
   * that cannot apply yet; behind, whether a beacon is ahead of the version;
   * listedWhileNull, whether a listed diff came while members were null (and no
   * state since); waiting, how many diffs are kept.
   */
  function createView() {
    var version = null;
    var members = null;
    var counts = null;
    // Whether members were ever known: before that a state compares with nobody.
    var known = false;
    // Diffs not applied yet, in (version, from) order.
    var kept = [];
    var beacon = null;
    var listedWhileNull = false;

    function change(type, before, after, lost) {
      var joins = [];
      var leaves = [];
      // Between a map and null (unlisted) nobody is known to have come or gone.
      if (before && after) {
        keys(after).forEach(function (key) {
          if (!hasOwn.call(before, key)) {
            joins.push({ key: key, member: after[key], metas: after[key].metas });
          }
        });
        keys(before).forEach(function (key) {
          if (!hasOwn.call(after, key)) {
            var metas = lost && lost[key] ? lost[key].sort(byJoinedAt) : before[key].metas;
            leaves.push({ key: key, member: before[key], metas: metas });
          }
        });
      }
      return {
        type: type,
        version: version,
        members: members,
        counts: counts,
        joins: joins,
        leaves: leaves,
      };
    }

    function applyListed(diff) {
      var next = {};
      var refs = {}; // ref -> key, over the view before this diff
      var touched = {}; // keys whose member is a new object already
      var lost = {}; // key -> metas it lost
      Object.keys(members).forEach(function (key) {
        next[key] = members[key];
        members[key].metas.forEach(function (meta) {
          refs[meta.ref] = key;
        });
      });

      function own(key, user) {
        if (!touched[key]) {
          var current = next[key];
          next[key] = {
            user: current ? current.user : user,
            metas: current ? current.metas.slice() : [],
          };
          touched[key] = true;
        }
        return next[key];
      }

      function remove(key, ref, reported) {
        var metas = own(key).metas;
        for (var i = 0; i < metas.length; i += 1) {
          if (metas[i].ref === ref) {
            (lost[key] = lost[key] || []).push(reported || metas[i]);
            metas.splice(i, 1);
            break;
          }
        }
        delete refs[ref];
      }

      keys(diff.leaves).forEach(function (key) {
        var left = diff.leaves[key];
        (isObject(left) && Array.isArray(left.metas) ? left.metas : []).forEach(function (meta) {
          if (isObject(meta) && hasOwn.call(refs, meta.ref)) {
            remove(refs[meta.ref], meta.ref, meta);
          }
        });
      });
      keys(diff.joins).forEach(function (key) {
        var joined = diff.joins[key];
        if (!isObject(joined) || !Array.isArray(joined.metas)) {
          return;
        }
        var target = own(key, joined.user);
        target.user = joined.user === undefined ? null : joined.user;
        joined.metas.forEach(function (meta) {
          if (!isObject(meta)) {
            return;
          }
          var holder = refs[meta.ref];
          if (holder !== undefined && holder !== key) {
            // A ref is unique in a room: under another key, it moved here.
            remove(holder, meta.ref);
          }
          for (var i = 0; i < target.metas.length; i += 1) {
            if (target.metas[i].ref === meta.ref) {
              target.metas.splice(i, 1);
              break;
            }
          }
          target.metas.push(meta);
          refs[meta.ref] = key;
        });
      });
      Object.keys(touched).forEach(function (key) {
        if (next[key].metas.length) {
          next[key].metas.sort(byJoinedAt);
        } else {
          delete next[key];
        }
      });
      return { members: next, lost: lost };
    }

    function applyOne(diff) {
      var before = members;
      var lost = null;
      if (diff.joins == null || diff.leaves == null) {
        members = null;
        listedWhileNull = false;
      } else if (members === null) {
        // A listed diff cannot rebuild the members a null view never had:
        // the client syncs, and meanwhile keeps them null.
        listedWhileNull = true;
      } else {
        var applied = applyListed(diff);
        members = applied.members;
        lost = applied.lost;
      }
      version = diff.version;
      counts = diff.counts === undefined ? counts : diff.counts;
      return change("diff", before, members, lost);
    }

    /* Apply the kept diffs that apply, lowest version first; drop the stale. */
    function drain() {
      var changes = [];
      var i = 0;
      while (i < kept.length) {
        var diff = kept[i];
        if (diff.version <= version) {
          kept.splice(i, 1);
        } else if (diff.from <= version) {
          kept.splice(i, 1);
          changes.push(applyOne(diff));
          i = 0;
        } else {
          i += 1;
        }
      }
      return changes;
    }

    function applyState(frame) {
      if (!isVersioned(frame) || (version !== null && frame.version < version)) {
        return [];
      }
      var before = known ? members : {};
      members = isObject(frame.members) ? membersOf(frame.members) : null;
      version = frame.version;
      counts = frame.counts === undefined ? null : frame.counts;
      known = true;
      listedWhileNull = false;
      return [change("state", before, members, null)].concat(drain());
    }

    function applyDiff(frame) {
      if (!isVersioned(frame) || typeof frame.from !== "number" || frame.from >= frame.version) {
        return [];
      }
      if (version !== null && frame.version <= version) {
        return []; // already applied, or older than the view
      }
      var at = 0;
      while (
        at < kept.length &&
        (kept[at].version < frame.version ||
          (kept[at].version === frame.version && kept[at].from < frame.from))
      ) {
        at += 1;
      }
      var twin = kept[at];
      if (!(twin && twin.version === frame.version && twin.from === frame.from)) {
        kept.splice(at, 0, frame);
      }
      // Before the first state, diffs wait for it.
      return version === null ? [] : drain();
    }

    function applyVersion(frame) {
      if (isVersioned(frame) && version !== null && frame.version > version) {
        beacon = beacon === null ? frame.version : Math.max(beacon, frame.version);
      }
      return view.behind;
    }

    var view = {
      applyState: applyState,
      applyDiff: applyDiff,
      applyVersion: applyVersion,
      receive: function (frame) {
        var type = frame && frame.type;
        if (type === "presence.state") {
          return applyState(frame);
        } else if (type === "presence.diff") {
          return applyDiff(frame);
        } else if (type === "presence.version") {
          applyVersion(frame);
        } else if (type === "presence.expired") {
          view.reset();
        }
        return [];
      },
      reset: function () {
        // The view is forgotten, but its members are kept, unseen, as the last
        // known: the next state's callbacks then say who came and went meanwhile
        // rather than joining everyone again.
        version = null;
        kept = [];
        beacon = null;
        listedWhileNull = false;
      },
      get version() {
        return version;
      },
      get members() {
        return version === null ? null : members;
      },
      get counts() {
        return version === null ? null : counts;
      },
      get gap() {
        return version !== null && kept.length > 0;
      },
      get behind() {
        return version !== null && beacon !== null && beacon > version;
      },
      get listedWhileNull() {
        return listedWhileNull;
      },
      get waiting() {
        return kept.length;
      },
    };
    return view;
  }

  function isVersioned(frame) {
    return isObject(frame) && typeof frame.version === "number" && isFinite(frame.version);
  }

  /*
   * Seconds to wait before reconnection number `attempt` (0 for the first):
   * "full jitter", a random time between 0 and min(maxDelay, minDelay * 2^attempt),
   * so that the clients of a restarted server do not all come back at once.
   */
  function backoffDelay(attempt, minDelay, maxDelay, random) {
    var ceiling = Math.min(maxDelay, minDelay * Math.pow(2, attempt));
    return (random || Math.random)() * ceiling;
  }

  /* A ws:// or wss:// URL for `url`, which may be a path of this page's host. */
  function socketUrl(url, location) {
    if (/^wss?:\/\//.test(url)) {
      return url;
    }
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var path = url.charAt(0) === "/" ? url : "/" + url;
    return scheme + location.host + path;
  }

  function checkOptions(options) {
    var settings = {};
    var name;
    for (name in DEFAULTS) {
      settings[name] = DEFAULTS[name];
    }
    for (name in options || {}) {
      if (!hasOwn.call(DEFAULTS, name)) {
        throw new TypeError(
          "ChannelsPresence.connect: unknown option " + JSON.stringify(name) +
          "; the options are " + Object.keys(DEFAULTS).join(", ")
        );
      }
      settings[name] = options[name];
    }
    ["heartbeatInterval", "minDelay", "maxDelay", "rejoinDelay"].forEach(function (key) {
      if (typeof settings[key] !== "number" || !(settings[key] > 0)) {
        throw new TypeError(
          "ChannelsPresence.connect: " + key + " must be a number of seconds above 0, not " +
          JSON.stringify(settings[key])
        );
      }
    });
    if (
      !Array.isArray(settings.rooms) ||
      !settings.rooms.every(function (room) {
        return typeof room === "string";
      })
    ) {
      throw new TypeError(
        "ChannelsPresence.connect: rooms must be an array of room names, not " +
        JSON.stringify(settings.rooms)
      );
    }
    Object.keys(DEFAULTS).forEach(function (key) {
      if (/^on[A-Z]/.test(key)) {
        if (typeof settings[key] !== "function") {
          throw new TypeError("ChannelsPresence.connect: " + key + " must be a function");
        }
        settings[key] = isolated(settings[key]);
      }
    });
    return settings;
  }

  /*
   * `callback`, whose exceptions are thrown again from a timer of their own:
   * they still reach the console and window.onerror, but a failing onJoin
   * cannot leave a view half reported or a reconnection never scheduled.
   */
  function isolated(callback) {
    if (callback === noop) {
      return noop;
    }
    return function () {
      try {
        callback.apply(null, arguments);
      } catch (error) {
        setTimeout(function () {
          throw error;
        });
      }
    };
  }

  function connect(url, options) {
    var settings = checkOptions(options);
    var target = socketUrl(url, window.location);
    var socket = null;
    var attempt = 0;
    var closed = false;
    var heartbeat = null;
    var reconnectTimer = null;
    var rejoinTimer = null;
    var status = null;
    // room -> {view, timers, lastSync, states}: the rooms this client is in or was.
    var rooms = {};
    // Rooms told presence.expired, waiting for the heartbeat that rejoins them.
    var expired = {};

    function setStatus(next) {
      if (next !== status) {
        status = next;
        settings.onStatus(next);
      }
    }

    function entry(room) {
      if (!hasOwn.call(rooms, room)) {
        rooms[room] = {
          view: createView(),
          timers: {},
          lastSync: -Infinity,
          states: 0, // states applied, to skip a sync a state already answered
        };
      }
      return rooms[room];
    }

    function startTimer(room, name, milliseconds, action) {
      var timers = entry(room).timers;
      if (!timers[name]) {
        timers[name] = setTimeout(function () {
          timers[name] = null;
          action();
        }, milliseconds);
      }
    }

    function stopTimer(room, name) {
      var timers = rooms[room].timers;
      clearTimeout(timers[name]);
      timers[name] = null;
    }

    function stopRoomTimers(room) {
      Object.keys(rooms[room].timers).forEach(function (name) {
        stopTimer(room, name);
      });
    }

    /* Ask for the room's state now, or once a second has passed since the last ask. */
    function requestSync(room) {
      var current = entry(room);
      if (current.timers.sync) {
        return; // one is on its way already
      }
      var states = current.states;
      var wait = current.lastSync + SYNC_INTERVAL - Date.now();
      startTimer(room, "sync", Math.max(0, wait), function () {
        if (current.states === states) {
          current.lastSync = Date.now();
          sendRaw(JSON.stringify({ type: "presence.sync", room: room }));
        }
      });
    }

    /* After a frame of `room`: start or stop the waits that end in a sync. */
    function watch(room) {
      var view = rooms[room].view;
      if (view.gap) {
        startTimer(room, "gap", GAP_WAIT, function () {
          if (view.gap) {
            requestSync(room);
          }
        });
      } else {
        stopTimer(room, "gap");
      }
      if (view.behind) {
        startTimer(room, "beacon", BEACON_WAIT, function () {
          if (view.behind) {
            requestSync(room);
          }
        });
      } else {
        stopTimer(room, "beacon");
      }
      if (view.listedWhileNull) {
        // At random, so that a room's thousands of clients do not all ask at once.
        startTimer(room, "unlisted", Math.random() * UNLISTED_WAIT, function () {
          if (view.listedWhileNull) {
            requestSync(room);
          }
        });
      } else {
        stopTimer(room, "unlisted");
      }
      if (view.version !== null) {
        stopTimer(room, "state");
      }
    }

    /* Sync `room` if it has no state `STATE_WAIT` from now. */
    function expectState(room) {
      var view = entry(room).view;
      startTimer(room, "state", STATE_WAIT, function () {
        if (view.version === null) {
          requestSync(room);
        }
      });
    }

    function report(room, changes) {
      changes.forEach(function (change) {
        change.joins.forEach(function (join) {
          settings.onJoin(join.key, join.member, join.metas, room);
        });
        change.leaves.forEach(function (leave) {
          settings.onLeave(leave.key, leave.member, leave.metas, room);
        });
        settings.onSync(change.members, change.counts, room);
        if (settings.onMembers !== noop) {
          settings.onMembers(memberList(change.members), change.counts, room);
        }
      });
    }

    function receivePresence(data) {
      var room = data.room;
      if (typeof room !== "string") {
        return;
      }
      var type = data.type;
      if (type === "presence.expired") {
        // The server joins the room again at our next message. Not at once:
        // the prune that dropped us may still be taking us out of the group.
        if (hasOwn.call(rooms, room)) {
          stopRoomTimers(room);
          rooms[room].view.reset();
        }
        expired[room] = true;
        clearTimeout(rejoinTimer);
        rejoinTimer = setTimeout(function () {
          rejoinTimer = null;
          if (sendRaw(HEARTBEAT)) {
            Object.keys(expired).forEach(expectState);
          }
          expired = {};
        }, (settings.rejoinDelay + Math.random() * settings.rejoinDelay) * 1000);
        return;
      }
      var known = hasOwn.call(rooms, room) && rooms[room].view.version !== null;
      if (type === "presence.version" && !known) {
        return; // a room this client is not in, or has no state of yet
      }
      var current = entry(room);
      if (type === "presence.state") {
        var changes = current.view.applyState(data);
        if (changes.length) {
          current.states += 1;
          // A state starts the waits afresh: whatever is still missing now is
          // missing from the state too.
          stopTimer(room, "gap");
          stopTimer(room, "beacon");
        }
        report(room, changes);
      } else if (type === "presence.diff") {
        report(room, current.view.applyDiff(data));
      } else {
        current.view.applyVersion(data);
      }
      watch(room);
    }

    function open() {
      if (status === null) {
        setStatus("connecting");
      }
      socket = new WebSocket(target);
      var held = null;
      socket.onopen = function () {
        setStatus("open");
        // The backoff starts over only once a connection has held: a server
        // that accepts and at once closes is not asked again every second.
        held = setTimeout(function () {
          attempt = 0;
        }, STABLE_AFTER * 1000);
        heartbeat = setInterval(function () {
          sendRaw(HEARTBEAT);
        }, settings.heartbeatInterval * 1000);
        settings.rooms.forEach(expectState);
      };
      socket.onmessage = function (event) {
        var data;
        try {
          data = JSON.parse(event.data);
        } catch (error) {
          return; // not ours, and not JSON: nothing to call back with
        }
        var type = data && data.type;
        if (
          type === "presence.state" ||
          type === "presence.diff" ||
          type === "presence.version" ||
          type === "presence.expired"
        ) {
          receivePresence(data);
        } else if (type === "presence.error") {
          settings.onError(data);
        } else {
          settings.onMessage(data);
        }
      };
      socket.onclose = function (event) {
        clearTimeout(held);
        stopTimers();
        socket = null;
        if (REFUSED.indexOf(event.code) !== -1) {
          closed = true; // refused: asking again would be refused again
        }
        if (closed) {
          setStatus("closed");
          return;
        }
        setStatus("reconnecting");
        var delay = backoffDelay(attempt, settings.minDelay, settings.maxDelay);
        attempt += 1;
        reconnectTimer = setTimeout(open, delay * 1000);
      };
    }

    /* The socket's timers, and every room's: a new socket starts each room afresh. */
    function stopTimers() {
      clearInterval(heartbeat);
      clearTimeout(rejoinTimer);
      heartbeat = rejoinTimer = null;
      expired = {};
      Object.keys(rooms).forEach(function (room) {
        stopRoomTimers(room);
        rooms[room].view.reset();
      });
    }

    function sendRaw(text) {
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(text);
        return true;
      }
      return false;
    }

    open();

    return {
      /* Send `data` as JSON; false if the socket is not open (nothing is queued). */
      send: function (data) {
        return sendRaw(JSON.stringify(data));
      },
      /* Close the socket for good: no reconnection. */
      close: function () {
        closed = true;
        clearTimeout(reconnectTimer);
        stopTimers();
        if (socket) {
          socket.close();
        } else {
          setStatus("closed");
        }
      },
      /* "connecting", "open", "reconnecting" or "closed". */
      get status() {
        return status;
      },
      /* The room's members, {key: member}: null before its first state or while unlisted. */
      members: function (room) {
        return hasOwn.call(rooms, room) ? rooms[room].view.members : null;
      },
      /* The room's version: null before its first state, and after presence.expired. */
      version: function (room) {
        return hasOwn.call(rooms, room) ? rooms[room].view.version : null;
      },
    };
  }

  return {
    connect: connect,
    createView: createView,
    memberList: memberList,
    backoffDelay: backoffDelay,
    socketUrl: socketUrl,
  };
});
