//! Local servers for the sink tests, on 127.0.0.1: kinesalite, moto, and the fault proxy
//! (`tests/e2e/fault_proxy.py`). Each is stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A server process, stopped when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// kinesalite in memory, on 127.0.0.1.
pub fn kinesalite() -> Server {
    assert!(
        root().join("node_modules/kinesalite").exists(),
        "node_modules/kinesalite is missing: run `make deps` first"
    );
    let port = free_port();
    let mut child = Command::new("node")
        .arg(root().join("tests/e2e/kinesalite.js"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Server { child, port }
}

/// The fault proxy in front of `upstream`, following `plan` (see the script).
pub fn proxy(upstream: &Server, plan: &str) -> Server {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make deps` first",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(root().join("tests/e2e/fault_proxy.py"))
        .arg(format!("http://127.0.0.1:{}", upstream.port))
        .arg(plan)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("fault proxy said {line:?}"));
    Server { child, port }
}

/// moto in server mode (Firehose with S3, SQS, DynamoDB), from the project's venv.
pub fn moto() -> Server {
    let moto = root().join(".venv/bin/moto_server");
    assert!(
        moto.exists(),
        "{} is missing: run `make deps` first",
        moto.display()
    );
    let port = free_port();
    let child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server");
    let server = Server { child, port };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto_server did not start on port {port}");
}
