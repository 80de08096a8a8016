//! Test hosts: N "hosts" on this machine for tests and benchmarks that need more than one.
//!
//! Each host is a network namespace with one interface (`eth0`, address `10.88.0.(i+1)/24`) on
//! a bridge that lives in a namespace of its own (the "switch"), so the bridge reaches nothing
//! but the hosts, and a mount namespace with a private `/dev/shm` (a tmpfs: shoal's host id
//! differs, so ranks on two hosts never pick shared memory between them). Processes run in a
//! host through `nsenter` (`TestHosts::command`); they are children of the caller, who reaps
//! them. Every namespace is held by one `sleep` process: when the harness is dropped, every
//! process in its hosts is killed and the namespaces vanish with their holders.
//!
//! Links are either a kernel bridge (`Links::Bridge`, the fast path) or this process
//! (`Links::Forwarded`): each host's `eth0` is then a TUN device whose packets a forwarder
//! thread here reads and writes into the destination host's TUN after the delay set by
//! `set_delay` (this kernel has no `netem`, so latency is added in user space).
//!
//! Faults: `cut`/`heal` take a host's link down and up; `drop_share` drops a share of the
//! host's packets both ways (nftables `numgen random`); `kill_host` kills every process whose
//! network namespace is the host's.
//!
//! Root only: `TestHosts::unavailable` says why not (a test prints it and returns).

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("test hosts: `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("test hosts: {0}")]
    Setup(String),
}

/// One namespace holder: a `sleep` whose namespaces the host's processes enter.
struct Holder {
    child: Child,
}

impl Holder {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// How the hosts are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// veth pairs on a kernel bridge.
    Bridge,
    /// TUN devices and a forwarder thread in this process that can add latency.
    Forwarded,
}

pub struct TestHosts {
    switch: Holder,
    hosts: Vec<Holder>,
    /// Interface names are `{prefix}s{i}` on the switch.
    prefix: String,
    dir: PathBuf,
    forwarder: Option<forward::Forwarder>,
}

/// The subnet every harness uses (each has its own isolated bridge, so they never meet).
const SUBNET: [u8; 3] = [10, 88, 0];

fn run(cmd: &mut Command) -> Result<String, HostError> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| HostError::Command { command: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(HostError::Command { command: shown, detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()) });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `unshare ARGS -- sh -c 'SETUP; echo ready; exec sleep 86400'` and waits for its
/// "ready", so the namespaces exist (and the setup ran) when this returns.
fn holder(unshare_args: &[&str], setup: &str) -> Result<Holder, HostError> {
    let script = format!("{setup} echo ready && exec sleep 86400");
    let mut child = Command::new("unshare")
        .args(unshare_args)
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostError::Setup(format!("starting unshare: {e}")))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout).read_line(&mut line).map_err(|e| HostError::Setup(e.to_string()))?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let out = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
        return Err(HostError::Setup(format!("a namespace holder did not start: {}", out.trim())));
    }
    Ok(Holder { child })
}

impl TestHosts {
    /// Why this machine cannot make test hosts (not root, a tool missing), or None.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("test hosts need root (network and mount namespaces); skipped".into());
        }
        for tool in ["ip", "unshare", "nsenter", "nft"] {
            let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
            if !found {
                return Some(format!("test hosts need `{tool}` (iproute2, util-linux, nftables), which is not installed"));
            }
        }
        None
    }

    /// `n` hosts on a bridge; `dir` holds each host's private folder (`host(i)`).
    pub fn new(n: usize, dir: &Path) -> Result<TestHosts, HostError> {
        Self::with_links(n, dir, Links::Bridge)
    }

    pub fn with_links(n: usize, dir: &Path, links: Links) -> Result<TestHosts, HostError> {
        if let Some(why) = Self::unavailable() {
            return Err(HostError::Setup(why));
        }
        if n == 0 || n > 200 {
            return Err(HostError::Setup(format!("{n} hosts: between 1 and 200")));
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = (std::process::id().wrapping_mul(16) + NEXT.fetch_add(1, Ordering::Relaxed)) & 0xfffff;
        let prefix = format!("sh{id:05x}");
        let switch = holder(&["--net"], "ip link set lo up && ip link add br0 type bridge && ip link set br0 up &&")?;
        let mut hs = TestHosts { switch, hosts: Vec::new(), prefix, dir: dir.to_path_buf(), forwarder: None };
        let mut tuns = Vec::new();
        for i in 0..n {
            std::fs::create_dir_all(hs.host_dir(i)).map_err(|e| HostError::Setup(format!("{}: {e}", hs.host_dir(i).display())))?;
            let h = holder(&["--net", "--mount", "--propagation", "private"], "mount -t tmpfs -o size=1g,mode=1777 shoal-shm /dev/shm &&")?;
            if links == Links::Forwarded {
                // The TUN is made here (its file stays with this process) and moved into the host.
                let name = format!("{}t{i}", hs.prefix);
                let tun = forward::open_tun(&name)?;
                run(Command::new("ip").args(["link", "set", &name, "netns", &h.pid().to_string()]))?;
                hs.hosts.push(h);
                let addr = format!("{}/24", hs.address(i));
                hs.in_host(i, &["ip", "link", "set", "lo", "up"])?;
                hs.in_host(i, &["ip", "link", "set", &name, "name", "eth0"])?;
                hs.in_host(i, &["ip", "link", "set", "eth0", "mtu", "65000"])?;
                hs.in_host(i, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
                hs.in_host(i, &["ip", "link", "set", "eth0", "up"])?;
                tuns.push(tun);
                continue;
            }
            let (hp, sp) = (format!("{}h{i}", hs.prefix), format!("{}s{i}", hs.prefix));
            run(Command::new("ip").args(["link", "add", &hp, "type", "veth", "peer", "name", &sp]))?;
            let moved = run(Command::new("ip").args(["link", "set", &hp, "netns", &h.pid().to_string()]))
                .and_then(|_| run(Command::new("ip").args(["link", "set", &sp, "netns", &hs.switch.pid().to_string()])));
            if let Err(e) = moved {
                let _ = run(Command::new("ip").args(["link", "del", &hp]));
                return Err(e);
            }
            hs.hosts.push(h);
            hs.in_switch(&["ip", "link", "set", &sp, "master", "br0"])?;
            hs.in_switch(&["ip", "link", "set", &sp, "up"])?;
            let addr = format!("{}/24", hs.address(i));
            hs.in_host(i, &["ip", "link", "set", "lo", "up"])?;
            hs.in_host(i, &["ip", "link", "set", &hp, "name", "eth0"])?;
            hs.in_host(i, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
            hs.in_host(i, &["ip", "link", "set", "eth0", "up"])?;
        }
        if links == Links::Forwarded {
            hs.forwarder = Some(forward::Forwarder::start(tuns, SUBNET));
        }
        Ok(hs)
    }

    /// One-way latency added to every packet between hosts (forwarded links only).
    pub fn set_delay(&self, delay: std::time::Duration) -> Result<(), HostError> {
        match &self.forwarder {
            Some(f) => {
                f.set_delay(delay);
                Ok(())
            }
            None => Err(HostError::Setup("latency needs forwarded links (TestHosts::with_links(.., Links::Forwarded))".into())),
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host i's address on the bridge.
    pub fn address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], (i + 1) as u8)
    }

    /// Host i's private folder (a folder of the caller's; by convention only this host's
    /// processes use it).
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("host{i}"))
    }

    /// `program` to run in host i (its network and mount namespaces). The child is the
    /// program itself: kill and wait on it as on any child.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.hosts[i].pid().to_string(), "-n", "-m", "--"]).arg(program);
        c
    }

    fn in_host(&self, i: usize, argv: &[&str]) -> Result<String, HostError> {
        run(self.command(i, argv[0]).args(&argv[1..]))
    }

    fn in_switch(&self, argv: &[&str]) -> Result<String, HostError> {
        run(Command::new("nsenter").args(["-t", &self.switch.pid().to_string(), "-n", "--"]).args(argv))
    }

    /// Takes host i's link down (at the switch, or the forwarder drops its packets):
    /// nothing in or out until `heal`.
    pub fn cut(&self, i: usize) -> Result<(), HostError> {
        self.set_link(i, false)
    }

    pub fn heal(&self, i: usize) -> Result<(), HostError> {
        self.set_link(i, true)
    }

    fn set_link(&self, i: usize, up: bool) -> Result<(), HostError> {
        match &self.forwarder {
            Some(f) => {
                f.set_cut(i, !up);
                Ok(())
            }
            None => self.in_switch(&["ip", "link", "set", &format!("{}s{i}", self.prefix), if up { "up" } else { "down" }]).map(drop),
        }
    }

    /// Drops `per_mille` of every thousand packets host i sends or receives on `eth0`
    /// (0 removes the rule).
    pub fn drop_share(&self, i: usize, per_mille: u32) -> Result<(), HostError> {
        let _ = self.in_host(i, &["nft", "delete", "table", "inet", "shoal_loss"]);
        if per_mille == 0 {
            return Ok(());
        }
        // numgen's values are 0..999: a thousand or more per thousand is every packet.
        let share = if per_mille >= 1000 { String::new() } else { format!("numgen random mod 1000 < {per_mille} ") };
        let rules = format!(
            "table inet shoal_loss {{\n chain inbound {{ type filter hook input priority 0; iifname \"eth0\" {share}drop; }}\n chain outbound {{ type filter hook output priority 0; oifname \"eth0\" {share}drop; }}\n}}\n"
        );
        let file = self.dir.join(format!("loss-{i}.nft"));
        std::fs::write(&file, rules).map_err(|e| HostError::Setup(e.to_string()))?;
        self.in_host(i, &["nft", "-f", &file.to_string_lossy()]).map(drop)
    }

    /// Sets a network sysctl in host i's namespace (`net.ipv4.tcp_slow_start_after_idle`, say).
    pub fn sysctl(&self, i: usize, key: &str, value: &str) -> Result<(), HostError> {
        if !key.starts_with("net.") {
            return Err(HostError::Setup(format!("{key}: only net.* sysctls belong to a host's namespace")));
        }
        self.in_host(i, &["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// The pids of every process in host i (its network namespace), the holder excepted.
    pub fn processes(&self, i: usize) -> Vec<u32> {
        let holder = self.hosts[i].pid();
        let Ok(ns) = std::fs::read_link(format!("/proc/{holder}/ns/net")) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != holder && std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l == ns))
            .collect()
    }

    /// SIGKILLs every process in host i (what losing the machine does to them); the host
    /// itself stays, so processes can be started in it again.
    pub fn kill_host(&self, i: usize) -> usize {
        let pids = self.processes(i);
        for &pid in &pids {
            // SAFETY: kill has no memory preconditions; a pid that exited meanwhile is ESRCH.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        pids.len()
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill_host(i);
        }
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
        for h in self.hosts.iter_mut().chain(std::iter::once(&mut self.switch)) {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
    }
}

/// The user-space links: a TUN per host, one reader thread per host, one writer thread that
/// holds each packet until its due time.
mod forward {
    use super::HostError;
    use std::collections::BinaryHeap;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};

    /// A TUN device (IPv4 packets, no extra header) named `name` in this network namespace.
    pub fn open_tun(name: &str) -> Result<File, HostError> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TUN: libc::c_short = 0x0001;
        const IFF_NO_PI: libc::c_short = 0x1000;
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| HostError::Setup(format!("/dev/net/tun: {e}")))?;
        // struct ifreq: the name (16 bytes), then the flags (a short) in a 24-byte union.
        let mut req = [0u8; 40];
        let bytes = name.as_bytes();
        if bytes.len() >= 16 {
            return Err(HostError::Setup(format!("interface name {name:?} is too long")));
        }
        req[..bytes.len()].copy_from_slice(bytes);
        req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is large enough for.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) };
        if rc < 0 {
            return Err(HostError::Setup(format!("TUNSETIFF {name}: {}", std::io::Error::last_os_error())));
        }
        Ok(file)
    }

    struct Held {
        due: Instant,
        seq: u64,
        to: usize,
        packet: Vec<u8>,
    }

    impl PartialEq for Held {
        fn eq(&self, o: &Self) -> bool {
            (self.due, self.seq) == (o.due, o.seq)
        }
    }
    impl Eq for Held {}
    impl PartialOrd for Held {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Held {
        // Reversed: BinaryHeap is a max-heap, the earliest due comes first.
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            (o.due, o.seq).cmp(&(self.due, self.seq))
        }
    }

    pub struct Forwarder {
        delay_us: Arc<AtomicU64>,
        cut: Arc<Vec<AtomicBool>>,
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Forwarder {
        pub fn start(tuns: Vec<File>, subnet: [u8; 3]) -> Forwarder {
            let delay_us = Arc::new(AtomicU64::new(0));
            let cut: Arc<Vec<AtomicBool>> = Arc::new((0..tuns.len()).map(|_| AtomicBool::new(false)).collect());
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::channel::<(usize, Vec<u8>, Instant)>();
            let writers: Vec<File> = tuns.iter().map(|t| t.try_clone().expect("dup a TUN")).collect();
            let mut threads = Vec::new();
            for (from, mut tun) in tuns.into_iter().enumerate() {
                let (tx, stop, cut) = (tx.clone(), stop.clone(), cut.clone());
                threads.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        let mut pfd = libc::pollfd { fd: tun.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: one valid pollfd.
                        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                            continue;
                        }
                        let Ok(n) = tun.read(&mut buf) else { continue };
                        // IPv4 only: the destination is bytes 16..20.
                        if n < 20 || buf[0] >> 4 != 4 || buf[16..19] != subnet || cut[from].load(Ordering::Relaxed) {
                            continue;
                        }
                        let to = buf[19] as usize;
                        if to == 0 {
                            continue;
                        }
                        if tx.send((to - 1, buf[..n].to_vec(), Instant::now())).is_err() {
                            return;
                        }
                    }
                }));
            }
            drop(tx);
            let (d, c, s) = (delay_us.clone(), cut.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut writers = writers;
                let mut heap = BinaryHeap::new();
                let mut seq = 0u64;
                while !s.load(Ordering::Relaxed) {
                    let wait = heap.peek().map(|h: &Held| h.due.saturating_duration_since(Instant::now())).unwrap_or(Duration::from_millis(100));
                    match rx.recv_timeout(wait) {
                        Ok((to, packet, at)) => {
                            seq += 1;
                            heap.push(Held { due: at + Duration::from_micros(d.load(Ordering::Relaxed)), seq, to, packet });
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let now = Instant::now();
                    while heap.peek().is_some_and(|h| h.due <= now) {
                        let h = heap.pop().expect("peeked");
                        if h.to < writers.len() && !c[h.to].load(Ordering::Relaxed) {
                            // A host whose link is down refuses the write: the packet is lost.
                            let _ = writers[h.to].write(&h.packet);
                        }
                    }
                }
            }));
            Forwarder { delay_us, cut, stop, threads }
        }

        pub fn set_delay(&self, d: Duration) {
            self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
        }

        pub fn set_cut(&self, host: usize, cut: bool) {
            if let Some(c) = self.cut.get(host) {
                c.store(cut, Ordering::Relaxed);
            }
        }

        pub fn stop(self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Option<(TestHosts, tempfile::TempDir)> {
        hosts_linked(n, Links::Bridge)
    }

    fn hosts_linked(n: usize, links: Links) -> Option<(TestHosts, tempfile::TempDir)> {
        if let Some(why) = TestHosts::unavailable() {
            eprintln!("{why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        Some((TestHosts::with_links(n, dir.path(), links).unwrap(), dir))
    }

    /// A listener in host `h` on port `port` that accepts and closes (python's, as the test
    /// image has it).
    fn listener(h: &TestHosts, host: usize, port: u16) -> Child {
        let server = format!("import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{}', {port}))\ns.listen(16)\nwhile True:\n  c,_=s.accept(); c.close()\n", h.address(host));
        h.command(host, "python3").args(["-c", &server]).spawn().unwrap()
    }

    /// A TCP connection from host `from` to port `port` of host `to` (bash's /dev/tcp, 2 s
    /// timeout): whether it connected.
    fn connects(h: &TestHosts, from: usize, to: usize, port: u16) -> bool {
        let probe = format!("exec 3<>/dev/tcp/{}/{port}", h.address(to));
        h.command(from, "timeout").args(["2", "bash", "-c", &probe]).stderr(Stdio::null()).status().unwrap().success()
    }

    #[test]
    fn hosts_reach_each_other_keep_their_shm_and_can_be_cut_and_killed() {
        let Some((h, _dir)) = hosts(2) else { return };
        let mut listener = listener(&h, 1, 7700);
        let up = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            connects(&h, 0, 1, 7700)
        });
        assert!(up, "host 0 reaches host 1");
        // Private /dev/shm: a file made in host 0 is not in host 1 nor here.
        let name = format!("shoal-testhosts-{}", std::process::id());
        run(h.command(0, "touch").arg(format!("/dev/shm/{name}"))).unwrap();
        assert!(run(h.command(0, "ls").arg("/dev/shm")).unwrap().contains(&name));
        assert!(!run(h.command(1, "ls").arg("/dev/shm")).unwrap().contains(&name));
        assert!(!Path::new("/dev/shm").join(&name).exists());
        // Cut, heal.
        h.cut(1).unwrap();
        assert!(!connects(&h, 0, 1, 7700), "a cut link carries nothing");
        h.heal(1).unwrap();
        assert!((0..30).any(|_| connects(&h, 0, 1, 7700)), "a healed link carries again");
        // All packets dropped is a cut too; 0 removes the rule.
        h.drop_share(0, 1000).unwrap();
        assert!(!connects(&h, 0, 1, 7700));
        h.drop_share(0, 0).unwrap();
        assert!(connects(&h, 0, 1, 7700));
        // Killing host 1 kills its processes, the listener among them.
        assert!(h.processes(1).contains(&listener.id()));
        assert!(h.kill_host(1) >= 1);
        let status = listener.wait().unwrap();
        assert!(!status.success());
        assert!(h.processes(1).is_empty());
        assert!(!connects(&h, 0, 1, 7700));
    }

    #[test]
    fn forwarded_links_add_the_delay_and_can_be_cut() {
        let Some((h, _dir)) = hosts_linked(2, Links::Forwarded) else { return };
        let mut server = listener(&h, 1, 7701);
        assert!((0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            connects(&h, 0, 1, 7701)
        }));
        // A connection takes a round trip: at least twice the one-way delay.
        h.set_delay(std::time::Duration::from_millis(60)).unwrap();
        let t = std::time::Instant::now();
        assert!(connects(&h, 0, 1, 7701));
        assert!(t.elapsed() >= std::time::Duration::from_millis(120), "{:?}", t.elapsed());
        h.set_delay(std::time::Duration::ZERO).unwrap();
        h.cut(0).unwrap();
        assert!(!connects(&h, 0, 1, 7701));
        h.heal(0).unwrap();
        assert!(connects(&h, 0, 1, 7701));
        let _ = server.kill();
        let _ = server.wait();
    }
}
