//! The launch environment of a data-parallel job: which rank this process is, how many there
//! are, and where rank 0's rendezvous store listens.
//!
//! Two launchers are understood, checked in this order:
//! - torchrun (`torchrun --nproc-per-node N --no-python BINARY ARGS`): `RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//! - Slurm (`srun BINARY ARGS`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`; the master is
//!   the first host of `SLURM_JOB_NODELIST` (or `MASTER_ADDR` when set), the port `MASTER_PORT`
//!   when set, else `15000 + SLURM_JOB_ID % 5000`, so that two jobs sharing a node differ.
//!
//! With none of these variables set the process runs alone ([`parse`] returns `Ok(None)`).
//! Reading the variables is separate from parsing them, so the parser is a pure function of a
//! lookup and is tested with tables.
//!
//! ```
//! use kd_native::launch::{parse, Launcher};
//!
//! let vars = [("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"),
//!             ("SLURM_JOB_NODELIST", "gpu[07-10,12]"), ("SLURM_JOB_ID", "4242")];
//! let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
//! let launch = parse(get).unwrap().unwrap();
//! assert_eq!((launch.rank, launch.world_size, launch.local_rank), (5, 8, 1));
//! assert_eq!((launch.master_addr.as_str(), launch.master_port), ("gpu07", 15000 + 4242));
//! assert_eq!(launch.launcher, Launcher::Slurm);
//! ```
use crate::{Error, Result};

/// Who started the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything setting `RANK` / `WORLD_SIZE` the same way).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
}

/// One process's place in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// The rank among the processes on this node; a CUDA process takes `cuda:local_rank`.
    pub local_rank: usize,
    /// The host of rank 0's rendezvous store.
    pub master_addr: String,
    /// The port of rank 0's rendezvous store.
    pub master_port: u16,
    /// Which launcher's variables these came from.
    pub launcher: Launcher,
    /// The launcher serves the rendezvous store itself (torchrun's agent sets
    /// `TORCHELASTIC_USE_AGENT_STORE=True`); see [`crate::dist::GroupOptions::launcher_store`].
    pub launcher_store: bool,
    /// How many times this host's torchrun agent has restarted its ranks
    /// (`TORCHELASTIC_RESTART_COUNT`; 0 for a first start and for other launchers). The agents of
    /// one restart may count differently, so the group does not rely on it (see
    /// [`crate::dist::GroupOptions::launcher_store`]).
    pub restart: u32,
}

const TORCHRUN: [&str; 5] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"];

/// The variable that bounds the rendezvous and each collective, in seconds.
pub const TIMEOUT_VAR: &str = "KD_DIST_TIMEOUT_S";

/// A port on 127.0.0.1 for rank 0's store when all ranks run on this machine (tests, a
/// workstation), free when checked. It lies below the kernel's ephemeral range (32768-60999 on
/// Linux), where every client socket and Gloo's own connections get their ports, so that no
/// connection takes it between this check and rank 0's bind (a port from `bind(0)` can be), and
/// above the 15000-19999 that Slurm jobs derive. Successive calls in a process return different
/// ports; processes start at different ports (by their id).
///
/// ```
/// let (a, b) = (kd_native::launch::free_loopback_port(), kd_native::launch::free_loopback_port());
/// assert!(a != b && (20_000..32_000).contains(&a));
/// ```
pub fn free_loopback_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (std::process::id().wrapping_mul(7919).wrapping_add(n.wrapping_mul(13)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// PyTorch's default timeout for a collective or the rendezvous.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The timeout of the process group from `KD_DIST_TIMEOUT_S` (seconds, may be fractional) as
/// `var` returns it, else [`DEFAULT_TIMEOUT`] (600 s, PyTorch's).
///
/// ```
/// use kd_native::launch::dist_timeout;
/// use std::time::Duration;
///
/// assert_eq!(dist_timeout(|_| None).unwrap(), Duration::from_secs(600));
/// assert_eq!(dist_timeout(|_| Some("2.5".into())).unwrap(), Duration::from_millis(2500));
/// assert!(dist_timeout(|_| Some("0".into())).is_err());
/// ```
pub fn dist_timeout(var: impl Fn(&str) -> Option<String>) -> Result<std::time::Duration> {
    let Some(v) = var(TIMEOUT_VAR) else { return Ok(DEFAULT_TIMEOUT) };
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(Error::Launch(format!("{TIMEOUT_VAR} = `{v}` is not a number of seconds > 0"))),
    }
}

/// Reads the launch variables of this process's environment; see [`parse`].
pub fn from_env() -> Result<Option<Launch>> {
    parse(|k| std::env::var(k).ok())
}

/// Parses the launch variables that `var` returns (`None` for an unset variable).
///
/// Returns `Ok(None)` when neither torchrun's `RANK` / `WORLD_SIZE` nor Slurm's `SLURM_PROCID`
/// is set, and an [`Error::Launch`] naming the variable when one is missing, not a number, or
/// inconsistent (a rank not below the world size, a world size of 0).
pub fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    if TORCHRUN[..2].iter().any(|k| var(k).is_some()) {
        return torchrun(&var).map(Some);
    }
    if var("SLURM_PROCID").is_some() {
        return slurm(&var).map(Some);
    }
    Ok(None)
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
    let missing: Vec<&str> = TORCHRUN.iter().copied().filter(|k| var(k).is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::Launch(format!(
            "{} set but {} missing; torchrun sets all of {} (is another launcher's variable left over?)",
            TORCHRUN.iter().filter(|k| var(k).is_some()).copied().collect::<Vec<_>>().join(", "),
            missing.join(", "),
            TORCHRUN.join(", ")
        )));
    }
    let get = |k: &str| var(k).unwrap_or_default();
    let world_size = number(&get, "WORLD_SIZE")?;
    let rank = number(&get, "RANK")?;
    let local_rank = number(&get, "LOCAL_RANK")?;
    let master_addr = get("MASTER_ADDR").trim().to_string();
    let master_port = port(&get("MASTER_PORT"), "MASTER_PORT")?;
    check(rank, world_size, local_rank, ("RANK", "WORLD_SIZE", "LOCAL_RANK"))?;
    if master_addr.is_empty() {
        return Err(Error::Launch("MASTER_ADDR is empty; expected the host of rank 0".into()));
    }
    let launcher_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let restart = match var("TORCHELASTIC_RESTART_COUNT") {
        None => 0,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Error::Launch(format!("TORCHELASTIC_RESTART_COUNT = `{v}` is not a non-negative integer")))?,
    };
    Ok(Launch {
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port,
        launcher: Launcher::Torchrun,
        launcher_store,
        restart,
    })
}

fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
    let required = |k: &str| {
        var(k).ok_or_else(|| Error::Launch(format!("SLURM_PROCID is set but {k} is missing; srun sets both")))
    };
    let get = |k: &str| var(k).unwrap_or_default();
    let rank = number(&get, "SLURM_PROCID")?;
    required("SLURM_NTASKS")?;
    let world_size = number(&get, "SLURM_NTASKS")?;
    let local_rank = match var("SLURM_LOCALID") {
        Some(_) => number(&get, "SLURM_LOCALID")?,
        None => return Err(Error::Launch("SLURM_PROCID is set but SLURM_LOCALID is missing; srun sets both".into())),
    };
    check(rank, world_size, local_rank, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))?;
    let master_addr = match var("MASTER_ADDR") {
        Some(addr) if !addr.trim().is_empty() => addr.trim().to_string(),
        _ => {
            let list = var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")).ok_or_else(|| {
                Error::Launch(
                    "SLURM_JOB_NODELIST is missing (and MASTER_ADDR is not set); expected the job's hosts".into(),
                )
            })?;
            first_host(&list)?
        }
    };
    let master_port = match var("MASTER_PORT") {
        Some(p) => port(&p, "MASTER_PORT")?,
        None => match var("SLURM_JOB_ID") {
            Some(_) => {
                let id: usize = number(&get, "SLURM_JOB_ID")?;
                (15000 + id % 5000) as u16
            }
            None => {
                return Err(Error::Launch(
                    "neither MASTER_PORT nor SLURM_JOB_ID is set; set MASTER_PORT to a free port".into(),
                ))
            }
        },
    };
    Ok(Launch {
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port,
        launcher: Launcher::Slurm,
        launcher_store: false,
        restart: 0,
    })
}

fn number(get: &impl Fn(&str) -> String, k: &str) -> Result<usize> {
    let v = get(k);
    v.trim().parse().map_err(|_| Error::Launch(format!("{k} = `{v}` is not a non-negative integer")))
}

fn port(v: &str, k: &str) -> Result<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::Launch(format!("{k} = `{v}` is not a port number (1 to 65535)"))),
    }
}

fn check(rank: usize, world: usize, local: usize, names: (&str, &str, &str)) -> Result<()> {
    let (r, w, l) = names;
    if world == 0 {
        return Err(Error::Launch(format!("{w} = 0; expected at least 1 process")));
    }
    if rank >= world {
        return Err(Error::Launch(format!("{r} = {rank} is not below {w} = {world}")));
    }
    if local > rank {
        return Err(Error::Launch(format!(
            "{l} = {local} exceeds {r} = {rank}; a local rank counts this node's processes"
        )));
    }
    Ok(())
}

/// The first host of a Slurm node list such as `node[01-04,07],gpu5`.
///
/// ```
/// assert_eq!(kd_native::launch::first_host("node[01-04,07],gpu5").unwrap(), "node01");
/// ```
pub fn first_host(list: &str) -> Result<String> {
    expand_hosts(list)?.into_iter().next().ok_or_else(|| Error::Launch(format!("node list `{list}` names no host")))
}

/// The most hosts a node list may expand to (a list that claims more is a mistake, and its
/// expansion would take memory out of proportion to the text).
const MAX_HOSTS: usize = 1 << 20;

/// Expands a Slurm compressed node list: comma-separated hosts, each with bracketed ranges and
/// numbers whose zero padding is kept (`n[08-10]` -> `n08, n09, n10`); several bracket groups
/// in one name expand as their product (`r[1-2]-n[1-2]` -> `r1-n1, r1-n2, r2-n1, r2-n2`).
pub fn expand_hosts(list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| Error::Launch(format!("node list `{list}`: {why}"));
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(|e| bad(&e))? {
        if item.is_empty() {
            return Err(bad("empty host name"));
        }
        // Alternating literal text and bracket groups, each group a list of choices.
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            let Some(open) = rest.find('[') else {
                names.iter_mut().for_each(|n| n.push_str(rest));
                break;
            };
            let close = rest[open..].find(']').map(|c| open + c).ok_or_else(|| bad("unclosed `[`"))?;
            let literal = &rest[..open];
            let choices = expand_group(&rest[open + 1..close]).map_err(|e| bad(&e))?;
            if (hosts.len() + names.len()).saturating_mul(choices.len()) > MAX_HOSTS {
                return Err(bad(&format!("expands to more than {MAX_HOSTS} hosts")));
            }
            names = names.iter().flat_map(|n| choices.iter().map(move |c| format!("{n}{literal}{c}"))).collect();
            rest = &rest[close + 1..];
        }
        hosts.extend(names);
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> std::result::Result<Vec<&str>, String> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested brackets".into());
        }
    }
    if depth != 0 {
        return Err("unclosed `[`".into());
    }
    out.push(list[start..].trim());
    Ok(out)
}

/// `01-03,07` -> `01, 02, 03, 07`.
fn expand_group(group: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in group.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.parse::<u64>().map_err(|_| format!("`{part}` in `[{group}]` is not a number or range"));
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range `{part}` runs backwards"));
        }
        if b - a > 100_000 {
            return Err(format!("range `{part}` is implausibly long"));
        }
        out.extend((a..=b).map(|n| format!("{n:0width$}", width = lo.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        parse(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    fn torchrun_vars(rank: &str, world: &str, local: &str) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", rank.into()),
            ("WORLD_SIZE", world.into()),
            ("LOCAL_RANK", local.into()),
            ("MASTER_ADDR", "10.0.0.1".into()),
            ("MASTER_PORT", "29500".into()),
        ]
    }

    fn with<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        assert_eq!(run(&[]).unwrap(), None);
        assert_eq!(run(&[("SLURM_JOB_ID", "5"), ("PATH", "/bin")]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let l = run(&with(&torchrun_vars("3", "4", "1"))).unwrap().unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                launcher: Launcher::Torchrun,
                launcher_store: false,
                restart: 0,
            }
        );
        let mut vars = torchrun_vars("0", "2", "0");
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True".into()));
        vars.push(("TORCHELASTIC_RESTART_COUNT", "3".into()));
        let l = run(&with(&vars)).unwrap().unwrap();
        assert!(l.launcher_store && l.restart == 3);
        vars.pop();
        vars.push(("TORCHELASTIC_RESTART_COUNT", "x".into()));
        let e = run(&with(&vars)).unwrap_err().to_string();
        assert!(e.contains("TORCHELASTIC_RESTART_COUNT"), "{e}");
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let owned = torchrun_vars("1", "2", "1");
        let mut vars = with(&owned);
        vars.extend([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")]);
        assert_eq!(run(&vars).unwrap().unwrap().launcher, Launcher::Torchrun);
    }

    /// (variables, text the error must contain)
    #[test]
    fn bad_torchrun_variables_are_named() {
        let table: Vec<(Vec<(&'static str, String)>, &str)> = vec![
            (torchrun_vars("2", "2", "0"), "RANK = 2 is not below WORLD_SIZE = 2"),
            (torchrun_vars("0", "0", "0"), "WORLD_SIZE = 0"),
            (torchrun_vars("x", "2", "0"), "RANK = `x` is not a non-negative integer"),
            (torchrun_vars("-1", "2", "0"), "RANK = `-1`"),
            (torchrun_vars("1", "2", "2"), "LOCAL_RANK = 2 exceeds RANK = 1"),
            (torchrun_vars("0", "2", "0")[..2].to_vec(), "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
            (vec![("WORLD_SIZE", "2".into())], "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
        ];
        for (vars, want) in table {
            let err = run(&with(&vars)).unwrap_err().to_string();
            assert!(err.contains(want), "{vars:?}: `{err}` lacks `{want}`");
        }
        let mut vars = torchrun_vars("0", "2", "0");
        vars[4].1 = "70000".into();
        assert!(run(&with(&vars)).unwrap_err().to_string().contains("MASTER_PORT = `70000` is not a port"));
        vars[4].1 = "29500".into();
        vars[3].1 = " ".into();
        assert!(run(&with(&vars)).unwrap_err().to_string().contains("MASTER_ADDR is empty"));
    }

    #[test]
    fn slurm_variables() {
        let base = [
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "a100-[003-004,9]"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let l = run(&base).unwrap().unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (9, 16, 1));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("a100-003", 15000 + 3456));
        // MASTER_ADDR and MASTER_PORT override the node list and the job id.
        let mut vars = base.to_vec();
        vars.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "4000")]);
        let l = run(&vars).unwrap().unwrap();
        assert_eq!((l.master_addr.as_str(), l.master_port), ("head", 4000));
        // Missing or inconsistent variables.
        let table: [(&[&str], &str); 4] = [
            (&["SLURM_NTASKS"], "SLURM_NTASKS is missing"),
            (&["SLURM_LOCALID"], "SLURM_LOCALID is missing"),
            (&["SLURM_JOB_NODELIST"], "SLURM_JOB_NODELIST is missing"),
            (&["SLURM_JOB_ID"], "neither MASTER_PORT nor SLURM_JOB_ID"),
        ];
        for (drop, want) in table {
            let vars: Vec<_> = base.iter().copied().filter(|(k, _)| !drop.contains(k)).collect();
            let err = run(&vars).unwrap_err().to_string();
            assert!(err.contains(want), "without {drop:?}: `{err}` lacks `{want}`");
        }
        let mut vars = base.to_vec();
        vars[1].1 = "8";
        assert!(run(&vars).unwrap_err().to_string().contains("SLURM_PROCID = 9 is not below SLURM_NTASKS = 8"));
    }

    #[test]
    fn node_lists_expand_like_slurm() {
        let table: [(&str, &[&str]); 6] = [
            ("node1", &["node1"]),
            ("node[01-04,07]", &["node01", "node02", "node03", "node04", "node07"]),
            ("a,b[8-10]", &["a", "b8", "b9", "b10"]),
            ("n[008-010],gpu5", &["n008", "n009", "n010", "gpu5"]),
            ("r[1-2]-n[1-2]", &["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
            ("x[3]", &["x3"]),
        ];
        for (list, want) in table {
            assert_eq!(expand_hosts(list).unwrap(), want, "{list}");
        }
        assert_eq!(first_host("gpu[12-13],cpu1").unwrap(), "gpu12");
        for (list, want) in [
            ("node[01-04", "unclosed"),
            ("node[4-1]", "runs backwards"),
            ("node[a-b]", "is not a number"),
            ("node[[1]]", "nested"),
            ("a,,b", "empty host"),
        ] {
            let err = expand_hosts(list).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(list), "{list}: `{err}` lacks `{want}`");
        }
    }

    /// Launch variables drawn at random from valid, edge and nonsense values: parsing never
    /// panics or allocates out of proportion, and whatever it accepts is consistent.
    #[test]
    fn random_launch_variables_parse_or_fail_cleanly() {
        const VARS: [&str; 15] = [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TORCHELASTIC_USE_AGENT_STORE",
            "TORCHELASTIC_RESTART_COUNT",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
            "SLURM_JOB_ID",
            "KD_DIST_TIMEOUT_S",
            "PATH",
        ];
        const VALUES: [&str; 34] = [
            "0",
            "1",
            "2",
            "3",
            "7",
            " 1 ",
            "",
            " ",
            "-1",
            "+1",
            "1.5",
            "1e3",
            "0x10",
            "65535",
            "65536",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "\u{ff10}",
            "\u{0}",
            "True",
            "true",
            "nan",
            "inf",
            "127.0.0.1",
            "host",
            "gpu[07-10,12]",
            "gpu[",
            "n[1-0]",
            "a[0-99999]b[0-99999]",
            "[]",
            "x[1-2]-y[01-03],z",
            "n[,]",
            "n[0-18446744073709551615]",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..20_000 {
            // Each variable unset or one of the values; torchrun's or Slurm's core set more often.
            // A valid torchrun or Slurm launch, or nothing, with up to 3 variables set to a
            // random value or removed.
            let mut vars: Vec<(&str, &str)> = match next(3) {
                0 => vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "1"),
                    ("MASTER_ADDR", "host"),
                    ("MASTER_PORT", "29500"),
                ],
                1 => vec![
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_LOCALID", "0"),
                    ("SLURM_JOB_NODELIST", "gpu[07-10,12]"),
                    ("SLURM_JOB_ID", "7"),
                ],
                _ => Vec::new(),
            };
            for _ in 0..next(4) {
                let k = VARS[next(VARS.len())];
                vars.retain(|(n, _)| *n != k);
                if next(4) > 0 {
                    vars.push((k, VALUES[next(VALUES.len())]));
                }
            }
            let parsed = std::panic::catch_unwind(|| run(&vars)).unwrap_or_else(|_| panic!("panicked on {vars:?}"));
            let _ = std::panic::catch_unwind(|| {
                dist_timeout(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
            })
            .unwrap_or_else(|_| panic!("dist_timeout panicked on {vars:?}"));
            match parsed {
                Ok(Some(l)) => {
                    accepted += 1;
                    assert!(l.world_size >= 1 && l.rank < l.world_size && l.local_rank <= l.rank, "{vars:?}: {l:?}");
                    assert!(l.master_port > 0 && !l.master_addr.trim().is_empty(), "{vars:?}: {l:?}");
                }
                Ok(None) => {}
                Err(e) => {
                    rejected += 1;
                    assert!(e.to_string().len() < 400, "{e}");
                }
            }
        }
        assert!(accepted > 100 && rejected > 100, "{accepted} accepted, {rejected} rejected");
    }

    #[test]
    fn a_node_list_that_expands_past_the_limit_is_an_error() {
        let e = expand_hosts("a[0-99999]b[0-99999]").unwrap_err().to_string();
        assert!(e.contains("expands to more than"), "{e}");
        assert_eq!(first_host("a[000-999]b[0-999]").unwrap(), "a000b0");
    }
}
