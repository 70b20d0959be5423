use super::*;

#[test]
fn brackets_inside_a_host_are_refused() {
    // Found by the mount_options fuzz target: `[[x]` was host `[x`, printed `[x:7700`,
    // which did not parse back.
    for bad in ["[[x]", "[x]]:7700", "a]b", "[a[b]:1"] {
        assert!(bad.parse::<Server>().is_err(), "{bad} accepted");
    }
    assert_eq!("[::1]:7700".parse::<Server>().unwrap().port, 7700);
}

#[test]
fn servers() {
    let s: Server = "node1".parse().unwrap();
    assert_eq!((s.host.as_str(), s.port), ("node1", 7700));
    assert_eq!(s.address(), "node1:7700");
    let s: Server = "10.0.0.5:7800".parse().unwrap();
    assert_eq!(s.address(), "10.0.0.5:7800");
    let s: Server = "[::1]:7701".parse().unwrap();
    assert_eq!((s.host.as_str(), s.port), ("::1", 7701));
    assert_eq!(s.address(), "[::1]:7701");
    assert_eq!("[fe80::1]".parse::<Server>().unwrap().port, 7700);
    assert!("::1".parse::<Server>().unwrap_err().contains("brackets"));
    assert!("h:0".parse::<Server>().unwrap_err().contains("port"));
    assert!("h:99999".parse::<Server>().unwrap_err().contains("port"));
    assert!(":7700".parse::<Server>().unwrap_err().contains("no host"));
    assert!("[::1".parse::<Server>().unwrap_err().contains("']'"));
}

#[test]
fn sources() {
    let s: Source = "node1:7700/disk".parse().unwrap();
    assert_eq!(s.server.address(), "node1:7700");
    assert_eq!(s.export, "disk");
    assert_eq!(s.to_string(), "node1:7700/disk");
    let s: Source = "node1/backup.img".parse().unwrap();
    assert_eq!(s.server.port, 7700);
    assert_eq!(s.export, "backup.img");
    let s: Source = "[2001:db8::7]:9000/d".parse().unwrap();
    assert_eq!(s.server.address(), "[2001:db8::7]:9000");
    assert!("node1:7700"
        .parse::<Source>()
        .unwrap_err()
        .contains("names no export"));
    assert!("node1/"
        .parse::<Source>()
        .unwrap_err()
        .contains("export name"));
    assert!("node1/a b".parse::<Source>().is_err());
    assert!("/disk".parse::<Source>().unwrap_err().contains("no host"));
}

#[test]
fn options_parse_and_convert() {
    let (o, w) = Options::parse(
            "key=/etc/dst/client.key,server_key=/etc/dst/server.key.pub,cipher=aesgcm,ro,\
             congestion-control=reno,resend_timeout=2s,resend_count=30,ping-interval=500ms,window_requests=64,\
             window_bytes=16M,max_transfer=256K,foreground,log_file=/var/log/dst.log",
            false,
        )
        .unwrap();
    assert!(w.is_empty());
    assert_eq!(o.key, Some(PathBuf::from("/etc/dst/client.key")));
    assert_eq!(o.server_key.as_deref(), Some("/etc/dst/server.key.pub"));
    assert_eq!(o.cipher, Some(Cipher::AesGcm));
    assert_eq!(o.congestion_control, Some(Congestion::Named("reno".into())));
    assert_eq!(o.read_only, Some(true));
    assert_eq!(o.resend_timeout, Some(Duration::from_secs(2)));
    assert_eq!(o.resend_count, Some(30));
    assert_eq!(o.ping_interval, Some(Duration::from_millis(500)));
    assert_eq!(o.window_requests, Some(64));
    assert_eq!(o.window_bytes, Some(16 << 20));
    assert_eq!(o.max_transfer, Some(256 << 10));
    assert_eq!(o.foreground, Some(true));
    assert_eq!(o.log_file, Some(PathBuf::from("/var/log/dst.log")));
}

#[test]
fn fail_fast_is_a_flag_that_layers() {
    for text in ["fail_fast", "fail-fast"] {
        let (o, _) = Options::parse(text, false).unwrap();
        assert_eq!(o.fail_fast, Some(true), "{text}");
    }
    let e = Options::parse("fail_fast=1", false).unwrap_err();
    assert!(e.contains("takes no value"), "{e}");
    let (fstab, _) = Options::parse("fail_fast,resend_timeout=3s", false).unwrap();
    let o = fstab.over(Options::parse("resend_count=5", false).unwrap().0);
    assert_eq!(o.fail_fast, Some(true));
    assert_eq!(o.resend_timeout, Some(Duration::from_secs(3)));
    assert_eq!(o.resend_count, Some(5));
    assert!(KNOWN_OPTIONS.contains("fail_fast"));
}

#[test]
fn mounts_are_found_topmost_first() {
    let mounts = "\
/dev/vda / ext4 rw,relatime 0 0
node1:7700/disk /mnt/remote fuse.dst rw,nosuid,nodev 0 0
node2:7700/disk /mnt/with\\040space fuse.dst rw 0 0
tmpfs /mnt/remote tmpfs rw 0 0
";
    let e = find_mount(mounts, Path::new("/mnt/remote/")).unwrap();
    assert_eq!((e.source.as_str(), e.fstype.as_str()), ("tmpfs", "tmpfs"));
    let e = find_mount(mounts, Path::new("/mnt/with space")).unwrap();
    assert_eq!(e.source, "node2:7700/disk");
    assert_eq!(e.mountpoint, PathBuf::from("/mnt/with space"));
    assert_eq!(e.fstype, "fuse.dst");
    assert_eq!(find_mount(mounts, Path::new("/mnt")), None);
    assert_eq!(find_mount("garbage\n", Path::new("/")), None);
}

#[test]
fn base64_server_key_keeps_its_equals_signs() {
    let key = "PFk3DYsaFUOvuur4zU69QxnLCX7aHkAQZgrHt68taT0=";
    let (o, _) = Options::parse(&format!("server_key={key}"), false).unwrap();
    assert_eq!(o.server_key.as_deref(), Some(key));
}

#[test]
fn mount_and_systemd_options_are_ignored() {
    let (o, w) = Options::parse(
            "defaults,_netdev,noauto,nofail,user,auto,nouser,x-systemd.automount,\
             x-systemd.requires=network-online.target,comment=systemd.mount,noatime,nosuid,nodev,rw",
            false,
        )
        .unwrap();
    assert!(w.is_empty());
    assert_eq!(
        o,
        Options {
            read_only: Some(false),
            ..Options::default()
        }
    );
}

#[test]
fn unknown_options_are_refused_with_the_known_ones() {
    let e = Options::parse("key=k,colour=blue", false).unwrap_err();
    assert!(e.contains("unknown mount option 'colour=blue'"), "{e}");
    assert!(e.contains("resend_timeout=DURATION"), "{e}");
    // mount -s: a warning instead.
    let (o, w) = Options::parse("key=k,colour=blue", true).unwrap();
    assert_eq!(o.key, Some(PathBuf::from("k")));
    assert_eq!(w, ["ignoring unknown mount option 'colour=blue'"]);
}

#[test]
fn bad_values_are_explained() {
    for (text, want) in [
        ("key", "needs a value"),
        ("key=", "needs a value"),
        ("ro=1", "takes no value"),
        ("cipher=rot13", "rot13"),
        ("congestion_control=cu/bic", "congestion control name"),
        ("resend_timeout=soon", "duration"),
        ("resend_timeout=0", "more than 0"),
        ("resend_count=-1", "whole number"),
        ("window_requests=0", "from 1"),
        ("window_bytes=0", "more than 0"),
        ("max_transfer=1K", "outside 4K"),
        ("max_transfer=8G", "outside 4K"),
    ] {
        let e = Options::parse(text, true).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
        assert!(e.starts_with(&format!("mount option '{text}'")), "{e}");
    }
}

#[test]
fn later_layers_win() {
    let (fstab, _) =
        Options::parse("key=a,ro,resend_count=3,congestion_control=reno", false).unwrap();
    let (cli, _) = Options::parse("key=b,rw,congestion_control=system", false).unwrap();
    let o = fstab.over(cli);
    assert_eq!(o.key, Some(PathBuf::from("b")));
    assert_eq!(o.congestion_control, Some(Congestion::System));
    assert_eq!(o.read_only, Some(false));
    assert_eq!(o.resend_count, Some(3));
}

const FSTAB: &str = "\
# /etc/fstab
UUID=1234  /      ext4  defaults 0 1
node1:7700/disk  /mnt/remote  dst  _netdev,key=/etc/dst/client.key,server_key=/etc/dst/server.key.pub  0 0
node2/backup  /mnt/with\\040space/  fuse.dst  ro,key=/k,server_key=/s
tmpfs /tmp tmpfs defaults 0 0
node3/bad /mnt/bad dst frobnicate
";

#[test]
fn fstab_lines_are_found_by_mount_point() {
    let e = find_fstab_entry(FSTAB, Path::new("/mnt/remote/"), false).unwrap();
    assert_eq!(e.source.to_string(), "node1:7700/disk");
    assert_eq!(e.mountpoint, PathBuf::from("/mnt/remote"));
    assert_eq!(e.options.key, Some(PathBuf::from("/etc/dst/client.key")));
    assert_eq!(e.options.read_only, None);

    let e = find_fstab_entry(FSTAB, Path::new("/mnt/with space"), false).unwrap();
    assert_eq!(e.source.to_string(), "node2:7700/backup");
    assert_eq!(e.options.read_only, Some(true));
}

#[test]
fn fstab_problems_are_explained() {
    let e = find_fstab_entry(FSTAB, Path::new("/mnt/none"), false).unwrap_err();
    assert!(e.contains("no fstab line mounts /mnt/none"), "{e}");
    let e = find_fstab_entry(FSTAB, Path::new("/tmp"), false).unwrap_err();
    assert!(e.contains("line 5") && e.contains("type 'tmpfs'"), "{e}");
    let e = find_fstab_entry(FSTAB, Path::new("/mnt/bad"), false).unwrap_err();
    assert!(e.contains("line 6") && e.contains("'frobnicate'"), "{e}");
}

#[test]
fn fstab_escapes() {
    assert_eq!(unescape("a\\040b"), "a b");
    assert_eq!(unescape("tab\\011"), "tab\t");
    assert_eq!(unescape("plain\\"), "plain\\");
    assert_eq!(unescape("\\09x"), "\\09x");
}

#[test]
fn export_names() {
    assert!(check_export_name("disk-1_a.img").is_ok());
    assert!(check_export_name("").is_err());
    assert!(check_export_name("a/b").is_err());
    assert!(check_export_name(&"x".repeat(256)).is_err());
}

fn invocation(positional: &[&str]) -> Invocation {
    Invocation {
        positional: positional.iter().map(|s| s.to_string()).collect(),
        ..Invocation::default()
    }
}

fn no_fstab() -> Result<String, String> {
    panic!("fstab must not be read")
}

#[test]
fn resolve_source_and_mount_point() {
    let r = resolve(invocation(&["node1/disk", "/mnt/r"]), no_fstab).unwrap();
    assert_eq!(r.source.to_string(), "node1:7700/disk");
    assert_eq!(r.mountpoint, PathBuf::from("/mnt/r"));

    let mut inv = invocation(&["/mnt/r"]);
    inv.server = Some("node1:7800".parse().unwrap());
    inv.export = Some("disk".into());
    let r = resolve(inv, no_fstab).unwrap();
    assert_eq!(r.source.to_string(), "node1:7800/disk");

    let mut inv = invocation(&["/mnt/r"]);
    inv.server = Some("node1".parse().unwrap());
    assert!(resolve(inv, no_fstab).unwrap_err().contains("--export"));
    let mut inv = invocation(&["node1/disk", "/mnt/r"]);
    inv.export = Some("disk".into());
    assert!(resolve(inv, no_fstab).unwrap_err().contains("not both"));
}

#[test]
fn resolve_layers_fstab_then_o_then_flags() {
    let mut inv = invocation(&["/mnt/remote"]);
    inv.option_strings = vec!["resend_count=5,ro".into(), "key=/o".into()];
    inv.flags.read_only = Some(false);
    let r = resolve(inv, || Ok(FSTAB.to_string())).unwrap();
    assert_eq!(r.source.to_string(), "node1:7700/disk");
    assert_eq!(r.options.key, Some(PathBuf::from("/o")));
    assert_eq!(
        r.options.server_key.as_deref(),
        Some("/etc/dst/server.key.pub")
    );
    assert_eq!(r.options.resend_count, Some(5));
    assert_eq!(r.options.read_only, Some(false));

    let e = resolve(invocation(&["/mnt/remote"]), || {
        Err("cannot read /etc/fstab".into())
    });
    assert_eq!(e.unwrap_err(), "cannot read /etc/fstab");
}

#[test]
fn resolve_collects_sloppy_warnings() {
    let mut inv = invocation(&["n/d", "/m"]);
    inv.option_strings = vec!["bogus".into()];
    assert!(resolve(inv.clone(), no_fstab).is_err());
    inv.sloppy = true;
    let r = resolve(inv, no_fstab).unwrap();
    assert_eq!(r.warnings, ["ignoring unknown mount option 'bogus'"]);
}
