#!/usr/bin/python3
"""A desktop's tray host, as an app with a StatusNotifierItem sees one, for the installed-app
test. It talks D-Bus on the session bus through GLib's Gio (Debian's python3-gi), the way the
trays of GNOME's AppIndicator extension, KDE and XFCE do.

  tray_host.py serve            owns org.kde.StatusNotifierWatcher; prints "watching" once it
                                does, "registered BUS PATH" for each item that registers, and
                                "gone BUS" when an item's connection closes (to stderr)
  tray_host.py menu BUS PATH    prints the item's exported menu (com.canonical.dbusmenu) as JSON
  tray_host.py click BUS PATH LABEL
                                clicks the menu entry with that label, as a tray does
"""

import json
import sys

from gi.repository import Gio, GLib

WATCHER = "org.kde.StatusNotifierWatcher"
WATCHER_XML = f"""<node><interface name="{WATCHER}">
  <method name="RegisterStatusNotifierItem"><arg type="s" direction="in"/></method>
  <method name="RegisterStatusNotifierHost"><arg type="s" direction="in"/></method>
  <property name="RegisteredStatusNotifierItems" type="as" access="read"/>
  <property name="IsStatusNotifierHostRegistered" type="b" access="read"/>
  <property name="ProtocolVersion" type="i" access="read"/>
  <signal name="StatusNotifierItemRegistered"><arg type="s"/></signal>
  <signal name="StatusNotifierItemUnregistered"><arg type="s"/></signal>
  <signal name="StatusNotifierHostRegistered"/>
</interface></node>"""
TIMEOUT_MS = 10_000


def say(*words):
    print(*words, file=sys.stderr, flush=True)


def serve():
    bus = Gio.bus_get_sync(Gio.BusType.SESSION)
    items = {}  # bus name -> object path

    def on_call(conn, sender, _path, _iface, method, params, invocation):
        if method == "RegisterStatusNotifierItem":
            (service,) = params.unpack()
            # An item names its object path (the sender is its bus) or its bus name.
            name, path = (sender, service) if service.startswith("/") else (service, "/StatusNotifierItem")
            items[name] = path
            say("registered", name, path)
            conn.emit_signal(None, "/StatusNotifierWatcher", WATCHER, "StatusNotifierItemRegistered",
                             GLib.Variant("(s)", (name + path,)))
        invocation.return_value(None)

    def on_get(_conn, _sender, _path, _iface, prop):
        if prop == "RegisteredStatusNotifierItems":
            return GLib.Variant("as", [name + path for name, path in items.items()])
        if prop == "IsStatusNotifierHostRegistered":
            return GLib.Variant("b", True)
        return GLib.Variant("i", 0)

    def on_owner_changed(_conn, _sender, _path, _iface, _signal, params):
        name, _old, new = params.unpack()
        if name in items and not new:
            del items[name]
            say("gone", name)

    info = Gio.DBusNodeInfo.new_for_xml(WATCHER_XML).interfaces[0]
    bus.register_object("/StatusNotifierWatcher", info, on_call, on_get, None)
    bus.signal_subscribe("org.freedesktop.DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                         "/org/freedesktop/DBus", None, Gio.DBusSignalFlags.NONE, on_owner_changed)
    Gio.bus_own_name_on_connection(bus, WATCHER, Gio.BusNameOwnerFlags.NONE,
                                   lambda *_: say("watching"),
                                   lambda *_: sys.exit(f"{WATCHER} is owned by another tray"))
    GLib.MainLoop().run()


def menu_path(bus, name, path):
    reply = bus.call_sync(name, path, "org.freedesktop.DBus.Properties", "Get",
                          GLib.Variant("(ss)", ("org.kde.StatusNotifierItem", "Menu")),
                          GLib.VariantType("(v)"), Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)
    return reply.unpack()[0]


def layout(bus, name, path):
    """The menu's entries as dicts: id, label, enabled, type and children."""
    menu = menu_path(bus, name, path)
    # A tray asks the app to bring the menu up to date before it shows it.
    bus.call_sync(name, menu, "com.canonical.dbusmenu", "AboutToShow", GLib.Variant("(i)", (0,)),
                  None, Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)
    reply = bus.call_sync(name, menu, "com.canonical.dbusmenu", "GetLayout",
                          GLib.Variant("(iias)", (0, -1, [])), GLib.VariantType("(u(ia{sv}av))"),
                          Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)

    def entry(node):
        ident, props, children = node
        return {
            "id": ident,
            # GTK's mnemonic marks: "__" is a written underscore, a single one marks the key.
            "label": props.get("label", "").replace("__", "\0").replace("_", "").replace("\0", "_"),
            "enabled": props.get("enabled", True),
            "visible": props.get("visible", True),
            "type": props.get("type", "standard"),
            "children": [entry(child) for child in children],
        }

    return menu, entry(reply.unpack()[1])["children"]


def find(entries, label):
    for e in entries:
        if e["label"] == label:
            return e
        found = find(e["children"], label)
        if found:
            return found
    return None


def main(args):
    if args[:1] == ["serve"]:
        return serve()
    bus = Gio.bus_get_sync(Gio.BusType.SESSION)
    if args[:1] == ["menu"] and len(args) == 3:
        print(json.dumps(layout(bus, args[1], args[2])[1]))
        return None
    if args[:1] == ["click"] and len(args) == 4:
        menu, entries = layout(bus, args[1], args[2])
        target = find(entries, args[3])
        if target is None:
            sys.exit(f"no menu entry {args[3]!r} in {[e['label'] for e in entries]}")
        bus.call_sync(args[1], menu, "com.canonical.dbusmenu", "Event",
                      GLib.Variant("(isvu)", (target["id"], "clicked", GLib.Variant("i", 0), 0)),
                      None, Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)
        return None
    sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
