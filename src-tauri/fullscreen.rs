//! Whether a program is full screen, for "hold while any program is full screen": the window
//! the window manager calls active (`_NET_ACTIVE_WINDOW` on the root) has
//! `_NET_WM_STATE_FULLSCREEN` in its `_NET_WM_STATE`, as EWMH window managers keep them. Under
//! X11 only: where there is no X server, or its window manager keeps no active window, the
//! desktop cannot tell and the rule holds nothing.

use std::sync::Mutex;

use neuroshard_base::sync::LockExt;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{AtomEnum, ConnectionExt as _, Window};
use x11rb::rust_connection::RustConnection;

x11rb::atom_manager! {
    /// The EWMH atoms read, interned once per connection.
    pub Atoms: AtomsCookie {
        _NET_ACTIVE_WINDOW,
        _NET_WM_STATE,
        _NET_WM_STATE_FULLSCREEN,
    }
}

/// An open connection: the server, its root window and the atoms interned on it.
#[derive(Debug)]
struct Display {
    conn: RustConnection,
    root: Window,
    atoms: Atoms,
}

impl Display {
    fn open() -> Option<Self> {
        let (conn, screen) = x11rb::connect(None).ok()?;
        let root = conn.setup().roots.get(screen)?.root;
        let atoms = Atoms::new(&conn).ok()?.reply().ok()?;
        Some(Display { conn, root, atoms })
    }
}

/// A connection to the X server, kept between ticks and opened again after an error.
#[derive(Debug, Default)]
pub struct FullScreen {
    display: Mutex<Option<Display>>,
}

impl FullScreen {
    /// Whether the active window is full screen on the display `$DISPLAY` names; none where
    /// that cannot be told.
    pub fn now(&self) -> Option<bool> {
        let mut held = self.display.lock_or_recover();
        if held.is_none() {
            *held = Display::open();
        }
        let display = held.as_ref()?;
        let answer = active_is_full_screen(&display.conn, display.root, &display.atoms);
        if answer.is_err() {
            *held = None;
        }
        answer.ok().flatten()
    }
}

/// Whether the active window under `root` is full screen; none where the window manager keeps
/// no active window; an error where the connection failed. Two round trips.
pub fn active_is_full_screen(
    conn: &impl Connection,
    root: Window,
    atoms: &Atoms,
) -> Result<Option<bool>, x11rb::errors::ReplyError> {
    let active = conn
        .get_property(
            false,
            root,
            atoms._NET_ACTIVE_WINDOW,
            AtomEnum::WINDOW,
            0,
            1,
        )?
        .reply()?;
    let Some(window) = active.value32().and_then(|mut w| w.next()) else {
        return Ok(None);
    };
    if window == x11rb::NONE {
        return Ok(Some(false));
    }
    let state = conn
        .get_property(false, window, atoms._NET_WM_STATE, AtomEnum::ATOM, 0, 64)?
        .reply()?;
    Ok(Some(state.value32().is_some_and(|mut s| {
        s.any(|a| a == atoms._NET_WM_STATE_FULLSCREEN)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use x11rb::protocol::xproto::{CreateWindowAux, PropMode, WindowClass};
    use x11rb::wrapper::ConnectionExt as _;

    /// An Xvfb of its own, whose display number it reports once it takes connections.
    struct Xvfb(std::process::Child, String);

    impl Xvfb {
        fn start() -> Option<Self> {
            let mut child = std::process::Command::new("Xvfb")
                .args(["-displayfd", "1", "-nolisten", "tcp"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let mut line = String::new();
            let stdout = child.stdout.take()?;
            std::io::BufReader::new(stdout).read_line(&mut line).ok()?;
            Some(Xvfb(child, format!(":{}", line.trim())))
        }
    }

    impl Drop for Xvfb {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Playing the window manager's part on a real X server, the active window's state is
    /// read: full screen, then not, then no active window at all (cannot tell).
    #[test]
    fn the_active_window_s_full_screen_state_is_read_from_the_x_server() {
        let Some(xvfb) = Xvfb::start() else {
            eprintln!("SKIPPED: Xvfb is not installed, so full-screen detection is not tested");
            return;
        };
        let (conn, screen) = x11rb::connect(Some(&xvfb.1)).unwrap();
        let screen = &conn.setup().roots[screen];
        let root = screen.root;
        let window = conn.generate_id().unwrap();
        conn.create_window(
            x11rb::COPY_DEPTH_FROM_PARENT,
            window,
            root,
            0,
            0,
            640,
            480,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new(),
        )
        .unwrap();
        let atoms = Atoms::new(&conn).unwrap().reply().unwrap();
        let (active, state) = (atoms._NET_ACTIVE_WINDOW, atoms._NET_WM_STATE);
        let full = atoms._NET_WM_STATE_FULLSCREEN;
        assert_eq!(active_is_full_screen(&conn, root, &atoms).unwrap(), None);
        conn.change_property32(PropMode::REPLACE, root, active, AtomEnum::WINDOW, &[window])
            .unwrap();
        conn.change_property32(PropMode::REPLACE, window, state, AtomEnum::ATOM, &[full])
            .unwrap();
        assert_eq!(
            active_is_full_screen(&conn, root, &atoms).unwrap(),
            Some(true)
        );
        conn.change_property32(PropMode::REPLACE, window, state, AtomEnum::ATOM, &[])
            .unwrap();
        assert_eq!(
            active_is_full_screen(&conn, root, &atoms).unwrap(),
            Some(false)
        );
    }
}
