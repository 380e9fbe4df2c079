/*
 * channels_presence browser client: presence in a room over a websocket.
 *
 * Plain JavaScript, no dependencies. Include it with
 *
 *     {% load static channels_presence %}
 *     <script src="{% static 'channels_presence/presence.js' %}"></script>
 *
 * and connect to a consumer that uses PresenceConsumerMixin:
 *
 *     const room = ChannelsPresence.connect("/ws/rooms/lobby/", {
 *       heartbeatInterval: {% presence_heartbeat_interval %},
 *       onMembers(members, anonymous, room) { ... },  // on every change
 *       onMessage(data) { ... },                      // your own messages
 *       onStatus(status) { ... },  // "connecting", "open", "reconnecting", "closed"
 *     });
 *     room.send({message: "hello"});
 *     room.close();
 *
 * It sends the heartbeat ("heartbeat", as JSON) every heartbeatInterval
 * seconds; reconnects after a lost connection with exponential backoff and
 * full jitter (minDelay * 2^attempt seconds at most, capped at maxDelay);
 * and, when the server says a prune dropped the socket (presence.expired),
 * sends a heartbeat after a short random pause, at which the mixin joins the
 * room again.
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
  // Seconds a connection must stay open before reconnections back off from
  // the start again.
  var STABLE_AFTER = 10;
  var DEFAULTS = {
    heartbeatInterval: 15, // seconds; the server's CHANNELS_PRESENCE_TOUCH_INTERVAL
    minDelay: 1, // seconds before the first reconnection, at most
    maxDelay: 30, // seconds between reconnections, at most
    rejoinDelay: 1, // seconds, at least, before joining again after presence.expired
    onMembers: function () {},
    onMessage: function () {},
    onStatus: function () {},
  };

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

  function connect(url, options) {
    var settings = {};
    var name;
    for (name in DEFAULTS) {
      settings[name] = DEFAULTS[name];
    }
    for (name in options || {}) {
      if (!(name in DEFAULTS)) {
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

    var target = socketUrl(url, window.location);
    var socket = null;
    var attempt = 0;
    var closed = false;
    var heartbeat = null;
    var reconnectTimer = null;
    var rejoinTimer = null;
    var status = null;

    function setStatus(next) {
      if (next !== status) {
        status = next;
        settings.onStatus(next);
      }
    }

    function stopTimers() {
      clearInterval(heartbeat);
      clearTimeout(rejoinTimer);
      heartbeat = rejoinTimer = null;
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
      };
      socket.onmessage = function (event) {
        var data;
        try {
          data = JSON.parse(event.data);
        } catch (error) {
          return; // not ours, and not JSON: nothing to call back with
        }
        if (data && data.type === "presence") {
          settings.onMembers(data.members, data.anonymous, data.room);
        } else if (data && data.type === "presence.expired") {
          // The server joins the room again at our next message. Not at once:
          // the prune that dropped us may still be taking us out of the group.
          clearTimeout(rejoinTimer);
          rejoinTimer = setTimeout(function () {
            sendRaw(HEARTBEAT);
          }, (settings.rejoinDelay + Math.random() * settings.rejoinDelay) * 1000);
        } else {
          settings.onMessage(data);
        }
      };
      socket.onclose = function () {
        clearTimeout(held);
        stopTimers();
        socket = null;
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
    };
  }

  return { connect: connect, backoffDelay: backoffDelay, socketUrl: socketUrl };
});
