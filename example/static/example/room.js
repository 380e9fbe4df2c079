/* The room page: a live member list and a chat, with channels_presence's presence.js. */
(function () {
  "use strict";
  var main = document.getElementById("content");
  var members = document.getElementById("members");
  var anonymous = document.getElementById("anonymous");
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

  function showMembers(list, visitors) {
    members.replaceChildren.apply(members, list.map(function (member) {
      var item = document.createElement("li");
      item.textContent = member.username;
      return item;
    }));
    anonymous.dataset.count = String(visitors);
    anonymous.textContent = visitors
      ? "and " + visitors + " visitor" + (visitors === 1 ? "" : "s")
      : "";
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
    onMembers: showMembers,
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
