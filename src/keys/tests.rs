use super::*;

fn msg<T: fmt::Debug>(r: Result<T, KeyError>) -> String {
    r.unwrap_err().0
}

#[test]
fn write_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let public = write_keypair(&path, false).unwrap();

    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let private = load_private(&path).unwrap();
    assert_eq!(private.public(), public);

    let pub_path = dir.path().join("node.key.pub");
    assert_eq!(
        fs::read_to_string(&pub_path).unwrap(),
        format!("{public}\n")
    );
    assert_eq!(load_public(pub_path.to_str().unwrap()).unwrap(), public);
}

#[test]
fn generated_keys_differ() {
    assert_ne!(generate().bytes(), generate().bytes());
}

#[test]
fn existing_key_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let first = write_keypair(&path, false).unwrap();
    let err = msg(write_keypair(&path, false));
    assert!(err.contains("already exists; pass --force"), "{err}");
    assert_eq!(load_private(&path).unwrap().public(), first);

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let second = write_keypair(&path, true).unwrap();
    assert_ne!(first, second);
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "--force must restore mode 0600");
    assert_eq!(load_private(&path).unwrap().public(), second);
}

#[test]
fn a_symlink_at_the_key_path_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, "precious\n").unwrap();
    let link = dir.path().join("k");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let err = msg(write_keypair(&link, false));
    assert!(err.contains("already exists"), "{err}");
    let err = msg(write_keypair(&link, true));
    assert!(err.contains("is a symbolic link; refusing"), "{err}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    assert!(!dir.path().join("k.pub").exists());

    // A dangling link, which O_CREAT alone would follow to create its target.
    let dangling = dir.path().join("d");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let err = msg(write_keypair(&dangling, false));
    assert!(err.contains("already exists"), "{err}");
    let err = msg(write_keypair(&dangling, true));
    assert!(err.contains("is a symbolic link; refusing"), "{err}");
    assert!(!dir.path().join("nowhere").exists());

    // Nor is the public key written through a link.
    let path = dir.path().join("p");
    std::os::unix::fs::symlink(&target, dir.path().join("p.pub")).unwrap();
    let err = msg(write_keypair(&path, true));
    assert!(err.contains("p.pub is a symbolic link; refusing"), "{err}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    assert!(!path.exists(), "a refused key pair leaves no private key");
}

#[test]
fn an_existing_public_key_file_is_refused_and_no_private_key_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let pub_path = dir.path().join("k.pub");
    fs::write(&pub_path, "an earlier key\n").unwrap();
    let err = msg(write_keypair(&path, false));
    assert!(
        err.contains(&format!("{} already exists", pub_path.display())),
        "{err}"
    );
    assert!(
        err.contains("remove it, or choose another name for the key"),
        "{err}"
    );
    assert!(!path.exists(), "a refused key pair leaves no private key");
    assert_eq!(fs::read_to_string(&pub_path).unwrap(), "an earlier key\n");

    // --force replaces both, as before.
    let public = write_keypair(&path, true).unwrap();
    assert_eq!(
        fs::read_to_string(&pub_path).unwrap(),
        format!("{public}\n")
    );
    assert_eq!(load_private(&path).unwrap().public(), public);

    // A refused --force leaves the old pair as it was.
    fs::remove_file(&pub_path).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &pub_path).unwrap();
    let err = msg(write_keypair(&path, true));
    assert!(err.contains("is a symbolic link; refusing"), "{err}");
    assert_eq!(load_private(&path).unwrap().public(), public);
    assert!(!dir.path().join("elsewhere").exists());
}

#[test]
fn refuses_private_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    write_keypair(&path, false).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = msg(load_private(&path));
    assert!(err.contains("readable by others (mode 0644)"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", path.display())),
        "{err}"
    );
}

#[test]
fn load_public_takes_literal_or_file() {
    let public = generate().public();
    let text = public.to_string();
    assert_eq!(text.len(), 44);
    assert_eq!(load_public(&text).unwrap(), public);
    assert_eq!(load_public(&format!("  {text}\n")).unwrap(), public);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.pub");
    fs::write(&path, format!("# the export node\n\n{text} node-a\n")).unwrap();
    assert_eq!(load_public(path.to_str().unwrap()).unwrap(), public);
}

#[test]
fn load_public_refuses_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    write_keypair(&path, false).unwrap();
    let err = msg(load_public(path.to_str().unwrap()));
    assert!(
        err.contains("is a private key; pass its public key"),
        "{err}"
    );
}

#[test]
fn bad_keys_are_explained() {
    let err = msg("abc".parse::<PublicKey>());
    assert!(err.contains("expected 44 characters of base64"), "{err}");
    // Valid base64, wrong length.
    let err = msg(BASE64.encode([1u8; 16]).parse::<PublicKey>());
    assert!(err.contains("not a dst public key"), "{err}");

    let err = msg(load_public("/nonexistent/key.pub"));
    assert!(
        err.contains("neither a base64 public key nor a readable key file"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.pub");
    fs::write(&path, "# only a comment\nnot-base64!\n").unwrap();
    let err = msg(load_public(path.to_str().unwrap()));
    assert!(err.contains("is not a dst public key file"), "{err}");

    let path = dir.path().join("bad.key");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(b"!!!!\n")
        .unwrap();
    let err = msg(load_private(&path));
    assert!(err.contains("is not a dst private key"), "{err}");

    let err = msg(load_private(&dir.path().join("missing")));
    assert!(err.contains("cannot read private key"), "{err}");
}

/// The blocklist, and each entry with the top bit of its last byte set.
fn low_order_keys() -> Vec<PublicKey> {
    LOW_ORDER
        .iter()
        .flat_map(|point| {
            let mut high = *point;
            high[KEY_LEN - 1] |= 0x80;
            [PublicKey(*point), PublicKey(high)]
        })
        .collect()
}

#[test]
fn low_order_points_are_weak_and_generated_keys_never() {
    let weak = low_order_keys();
    assert_eq!(weak.len(), 14);
    assert!(weak.iter().all(PublicKey::is_weak));
    assert!(PublicKey([0; KEY_LEN]).is_weak());
    // Neighbours of the listed points are not.
    for point in &weak {
        let mut near = point.0;
        near[1] ^= 1;
        assert!(!PublicKey(near).is_weak(), "{}", PublicKey(near));
    }
    for _ in 0..1000 {
        let key = generate().public();
        assert!(!key.is_weak(), "{key}");
    }
}

#[test]
fn low_order_points_give_the_all_zero_diffie_hellman_result() {
    // What makes them weak, and what snow 0.10 computes without complaint.
    for point in low_order_keys() {
        for _ in 0..4 {
            let mut dh = DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
            dh.set(generate().bytes());
            let mut out = [0xaa; KEY_LEN];
            dh.dh(&point.0, &mut out).unwrap();
            assert_eq!(out, [0; KEY_LEN], "{point}");
        }
    }
}

#[test]
fn weak_keys_are_refused_as_text_literal_or_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    for (i, key) in low_order_keys().into_iter().enumerate() {
        let text = key.to_string();
        let err = msg(text.parse::<PublicKey>());
        assert!(err.contains("is a low-order (weak) key"), "{err}");
        assert!(err.starts_with(&text), "{err}");
        assert!(PublicKey::parse_allowing_weak(&text).unwrap().is_weak());

        // --server-key and server_key= take the key itself or a file with it.
        let err = msg(load_public(&format!(" {text}\n")));
        assert!(err.contains("is a low-order (weak) key"), "{err}");
        let path = dir.path().join(format!("weak{i}.pub"));
        fs::write(&path, format!("# a weak key\n{text} node\n")).unwrap();
        let err = msg(load_public(path.to_str().unwrap()));
        assert!(
            err.contains(&format!(
                "the key in {}, {text}, is a low-order (weak) key",
                path.display()
            )),
            "{err}"
        );
    }
}

#[test]
fn private_keys_are_zeroed_on_drop() {
    fn zeroed_on_drop<T: ZeroizeOnDrop>() {}
    zeroed_on_drop::<PrivateKey>();
}

#[test]
fn debug_hides_private_key() {
    let key = generate();
    let shown = format!("{key:?}");
    assert_eq!(shown, "PrivateKey(..)");
    assert!(!shown.contains(&BASE64.encode(key.bytes())));
}
