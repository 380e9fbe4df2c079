/* The room page: a live member list and a chat, with channels_presence's presence.js. */
(function () {
  "use strict";
  var main = document.getElementById("content");
  var roomName = main.dataset.room;
  var members = document.getElementById("members");
  var unlisted = document.getElementById("unlisted");
  var anonymous = document.getElementById("anonymous");
  var countFields = {
    users: document.getElementById("count-users"),
    visitors: document.getElementById("count-visitors"),
    sockets: document.getElementById("count-sockets"),
  };
  var status = document.getElementById("status");
  var messages = document.getElementById("messages");
  var form = document.getElementById("chat-form");
  var input = document.getElementById("chat-input");
  var STATUS_TEXT = {
    connecting: "Connecting…",
    open: "Live: this list changes as people come and go.",
    reconnecting: "Connection lost; reconnecting…",
    closed: "Disconnected.",
  };

  function plural(count, word) {
    return count + " " + word + (count === 1 ? "" : "s");
  }

  /* What to call a user: the server sends the fields CHANNELS_PRESENCE_MEMBER_FIELDS names. */
  function userName(user) {
    return String(user.username || user.name || "user " + user.id);
  }

  /* Users by name, with their tab count when they have more than one open. */
  function showList(list) {
    members.hidden = list === null;
    unlisted.hidden = list !== null;
    var users = (list || [])
      .filter(function (member) {
        return member.user !== null;
      })
      .map(function (member) {
        return { name: userName(member.user), tabs: member.metas.length };
      })
      .sort(function (a, b) {
        return a.name.localeCompare(b.name);
      });
    members.replaceChildren.apply(members, users.map(function (user) {
      var item = document.createElement("li");
      item.textContent = user.name;
      if (user.tabs > 1) {
        var tabs = document.createElement("span");
        tabs.className = "tabs";
        tabs.textContent = " (" + plural(user.tabs, "tab") + ")";
        item.append(tabs);
      }
      return item;
    }));
  }

  /* Visitors are counted per browser session, not per tab. */
  function showCounts(counts) {
    anonymous.dataset.count = String(counts.visitors);
    anonymous.textContent = counts.visitors ? "and " + plural(counts.visitors, "visitor") : "";
    Object.keys(countFields).forEach(function (name) {
      countFields[name].textContent = String(counts[name]);
    });
  }

  function showMessage(data) {
    var item = document.createElement("li");
    var author = document.createElement("strong");
    author.textContent = (data.author || "a visitor") + ": ";
    item.append(author, document.createTextNode(data.message));
    messages.append(item);
    messages.scrollTop = messages.scrollHeight;
  }

  var room = ChannelsPresence.connect(main.dataset.socketUrl, {
    heartbeatInterval: Number(main.dataset.heartbeatInterval),
    rooms: [roomName],
    onMembers: function (list, counts, name) {
      if (name === roomName) {
        showList(list);
        showCounts(counts);
      }
    },
    onMessage: function (data) {
      if (data.type === "chat") {
        showMessage(data);
      }
    },
    onStatus: function (state) {
      status.dataset.status = state;
      status.textContent = STATUS_TEXT[state];
    },
  });
  window.presenceRoom = room;

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (input.value.trim() && room.send({ message: input.value })) {
      input.value = "";
    }
  });
})();
