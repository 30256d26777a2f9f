//! `git://`: one TCP connection to a git daemon, the request line, then git's protocol.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use super::{Context, pkt_line};

/// git daemon's port when the URL names none.
const DEFAULT_PORT: u16 = 9418;

/// `git://host[:port]/path` -> (host, port, path), the path with its leading `/`.
fn parse(url: &str) -> Option<(String, u16, String)> {
    let rest = url
        .get(..6)?
        .eq_ignore_ascii_case("git://")
        .then(|| &url[6..])?;
    let slash = rest.find('/')?;
    let (authority, path) = rest.split_at(slash);
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().ok()?,
    };
    Some((host.to_owned(), port, path.to_owned()))
}

/// An open connection to a git daemon whose every read and write obeys the fetch's context.
pub(super) struct Connection {
    ctx: Arc<Context>,
    socket: TcpStream,
}

impl Connection {
    /// Connects to the daemon of `url` and asks for `git-upload-pack`.
    pub(super) fn open(ctx: &Arc<Context>, url: &str) -> io::Result<Connection> {
        let (host, port, path) = parse(url).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "not a git://host/path URL")
        })?;
        let socket = connect(ctx, &host, port)?;
        socket.set_nodelay(true)?;
        let mut conn = Connection {
            ctx: Arc::clone(ctx),
            socket,
        };
        let shown_host = if port == DEFAULT_PORT {
            host.clone()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let request = format!("git-upload-pack {path}\0host={shown_host}\0");
        conn.write_all(&pkt_line(request.as_bytes()))?;
        Ok(conn)
    }
}

/// Connects to the first address of `host` that answers, within the fetch's deadline.
fn connect(ctx: &Context, host: &str, port: u16) -> io::Result<TcpStream> {
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {host}: {e}")))?;
    let mut last = None;
    for address in addresses {
        ctx.check()?;
        let limit = ctx.remaining().unwrap_or(Duration::from_secs(3600));
        match TcpStream::connect_timeout(&address, limit.max(Duration::from_millis(1))) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                ctx.check()?;
                last = Some(e);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("no address"));
    Err(io::Error::new(
        e.kind(),
        format!("cannot connect to {host} port {port}: {e}"),
    ))
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.socket.set_read_timeout(Some(self.ctx.slice()?))?;
            match self.socket.read(buf) {
                Err(e) if is_timeout(&e) => continue,
                other => return other,
            }
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.socket.set_write_timeout(Some(self.ctx.slice()?))?;
            match self.socket.write(buf) {
                Err(e) if is_timeout(&e) => continue,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket timeout: `WouldBlock` on Linux (EAGAIN), `TimedOut` elsewhere.
pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_urls() {
        assert_eq!(
            parse("git://127.0.0.1:9419/a/b.git"),
            Some(("127.0.0.1".into(), 9419, "/a/b.git".into()))
        );
        assert_eq!(
            parse("GIT://host/~u/r"),
            Some(("host".into(), DEFAULT_PORT, "/~u/r".into()))
        );
        assert_eq!(
            parse("git://[::1]:1/r"),
            Some(("::1".into(), 1, "/r".into()))
        );
        assert_eq!(parse("git://host"), None);
        assert_eq!(parse("git://:1/r"), None);
        assert_eq!(parse("git://h:x/r"), None);
    }
}
