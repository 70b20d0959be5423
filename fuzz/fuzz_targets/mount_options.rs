//! What dst-mount and mount.dst are told (`dst::mount_options`) on arbitrary text: mount
//! option strings, sources and server addresses, fstab text and whole invocations. Never a
//! panic, errors in their documented shapes, and the algebra the layering relies on:
//! parsing `A,B` is parsing A, then B over it.
#![no_main]

use std::path::Path;

use dst::mount_options::{
    check_export_name, find_fstab_entry, resolve, Invocation, Options, Server, Source,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    options(text);
    // The option algebra on two halves: before the first newline and after it.
    if let Some((a, b)) = text.split_once('\n') {
        layering(a, b);
    }
    addresses(text);
    fstab(text, data.len() % 2 == 1);
    invocation(text, data.len() % 2 == 1);
});

/// One option string, strict and sloppy (mount -s).
fn options(text: &str) {
    let strict = Options::parse(text, false);
    let sloppy = Options::parse(text, true);
    match &strict {
        Ok((o, warnings)) => {
            assert!(warnings.is_empty(), "strict parsing warned: {warnings:?}");
            // Nothing unknown, so sloppy parsing agrees exactly.
            assert_eq!(sloppy.as_ref(), Ok(&(o.clone(), Vec::new())));
            valid(o);
        }
        Err(e) if e.starts_with("unknown mount option '") => {
            assert!(e.contains("known options: "), "{e}");
        }
        Err(e) => {
            // A bad value is an error with or without -s.
            assert!(e.starts_with("mount option '"), "{e}");
            assert!(
                sloppy.is_err(),
                "sloppy parsing accepted what strict called bad: {e}"
            );
        }
    }
    match &sloppy {
        Ok((o, warnings)) => {
            valid(o);
            assert!(warnings.len() <= text.split(',').count());
            for w in warnings {
                assert!(w.starts_with("ignoring unknown mount option '"), "{w}");
            }
        }
        Err(e) => assert!(e.starts_with("mount option '"), "{e}"),
    }
    if let Ok((o, _)) = sloppy {
        // Layering with nothing, or with itself, changes nothing.
        assert_eq!(o.clone().over(Options::default()), o);
        assert_eq!(Options::default().over(o.clone()), o);
        assert_eq!(o.clone().over(o.clone()), o);
    }
}

/// What a parsed option guarantees to the code that uses it.
fn valid(o: &Options) {
    assert!(o.resend_timeout.is_none_or(|d| !d.is_zero()));
    assert!(o.ping_interval.is_none_or(|d| !d.is_zero()));
    assert!(o.window_requests.is_none_or(|n| n >= 1));
    assert!(o.window_bytes.is_none_or(|n| n >= 1));
    assert!(o.max_transfer.is_none_or(|n| n >= 4096));
    assert!(o.key.as_ref().is_none_or(|k| !k.as_os_str().is_empty()));
    assert!(o.server_key.as_ref().is_none_or(|k| !k.is_empty()));
    assert!(o
        .log_file
        .as_ref()
        .is_none_or(|f| !f.as_os_str().is_empty()));
}

/// `-o A -o B` means the same as `-o A,B`: B's settings over A's.
fn layering(a: &str, b: &str) {
    for sloppy in [false, true] {
        let (Ok((oa, wa)), Ok((ob, wb))) = (Options::parse(a, sloppy), Options::parse(b, sloppy))
        else {
            continue;
        };
        let (o, w) = Options::parse(&format!("{a},{b}"), sloppy)
            .unwrap_or_else(|e| panic!("{a:?} and {b:?} parse, joined not: {e}"));
        assert_eq!(o, oa.over(ob));
        assert_eq!(w, [wa, wb].concat());
    }
}

/// Sources and servers: what parses prints back to itself.
fn addresses(text: &str) {
    if let Ok(server) = text.parse::<Server>() {
        check_server(&server);
    }
    match text.parse::<Source>() {
        Ok(source) => {
            check_server(&source.server);
            assert!(check_export_name(&source.export).is_ok());
            assert_eq!(source.to_string().parse::<Source>(), Ok(source));
        }
        Err(e) => assert!(
            e.starts_with("source '") || e.starts_with("server '"),
            "{e}"
        ),
    }
}

fn check_server(s: &Server) {
    assert!(!s.host.is_empty() && s.port != 0);
    assert!(!s.host.contains(|c: char| c.is_whitespace() || c == '/'));
    assert_eq!(s.to_string(), s.address());
    assert_eq!(s.address().parse::<Server>().as_ref(), Ok(s));
}

/// fstab text, looked up by the mount point of its first line and by a fixed one.
fn fstab(text: &str, sloppy: bool) {
    let first = text
        .lines()
        .find_map(|l| l.split_whitespace().nth(1))
        .unwrap_or("/mnt/remote");
    for mountpoint in [first, "/mnt/remote"] {
        match find_fstab_entry(text, Path::new(mountpoint), sloppy) {
            Ok(e) => {
                check_server(&e.source.server);
                assert!(check_export_name(&e.source.export).is_ok());
                valid(&e.options);
                assert!(sloppy || e.warnings.is_empty());
            }
            Err(e) => assert!(
                e.starts_with("fstab line ") || e.starts_with("no fstab line mounts "),
                "{e}"
            ),
        }
    }
}

/// An invocation: the first line gives the positional arguments, the others are `-o`
/// strings, and the whole text is the fstab.
fn invocation(text: &str, sloppy: bool) {
    let mut lines = text.lines();
    let inv = Invocation {
        positional: lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .take(3)
            .map(String::from)
            .collect(),
        option_strings: lines.take(4).map(String::from).collect(),
        sloppy,
        ..Invocation::default()
    };
    let given = inv.positional.len();
    if let Ok(r) = resolve(inv, || Ok(text.to_string())) {
        assert!((1..=2).contains(&given));
        check_server(&r.source.server);
        assert!(check_export_name(&r.source.export).is_ok());
        valid(&r.options);
        assert!(sloppy || r.warnings.is_empty());
    }
}
