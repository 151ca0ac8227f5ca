//! Source schemes against a real origin: `hf://` through `HF_ENDPOINT` with `HF_TOKEN`.

mod common;

use std::fs;

use common::*;

const TOKEN: &str = "hf_wanfs_test_token_5f3a";

/// The bearer token goes to the endpoint, never to the host a redirect points to.
#[test]
fn hf_token_sent_to_endpoint_not_across_redirects() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    // The hub layout: {endpoint}/org/repo/resolve/rev/{path}, served by both origins.
    let root = work.path().join("hub");
    let resolve = root.join("wan-ai/wan-test/resolve/main");
    fs::create_dir_all(resolve.parent().expect("parent")).expect("mkdir hub");
    std::os::unix::fs::symlink(fixture_models().join(TI2V), &resolve)
        .expect("symlink model into hub");
    let endpoint = Origin::start(&root);
    let cdn = Origin::start_on("127.0.0.2", &root);

    let opts = BuildOpts {
        chunk_size: Some(65536),
        sources: vec!["hf://wan-ai/wan-test@main".into()],
        whole_only: false,
    };
    let entry = manifest_build(&fixture_models().join(TI2V), TI2V, &opts);
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let spec = MountSpec::new(work.path(), &manifest)
        .env("HF_ENDPOINT", &endpoint.url())
        .env("HF_TOKEN", TOKEN);
    let mount = Mount::start(spec);

    // Served by the endpoint itself.
    let model = "diffusion_pytorch_model-00001-of-00001.safetensors";
    let want = fs::read(fixture_models().join(TI2V).join(model)).expect("fixture");
    let got =
        read_range(&mount.path(&format!("{TI2V}/{model}")), 0, 4096).expect("read through hf://");
    assert_bytes_eq(&got, &want[..4096], model);
    let direct = endpoint.gets(&format!("/wan-ai/wan-test/resolve/main/{model}"));
    assert!(
        !direct.is_empty(),
        "no request at {{HF_ENDPOINT}}/wan-ai/wan-test/resolve/main/{model}: {:?}",
        endpoint.requests()
    );
    for r in &direct {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "Authorization sent to the endpoint"
        );
    }

    // Redirected to another host (127.0.0.2), as the hub does to its CDN.
    endpoint.redirect_to(Some(cdn.url()));
    let vae = "Wan2.2_VAE.safetensors";
    let want = fs::read(fixture_models().join(TI2V).join(vae)).expect("fixture");
    assert_bytes_eq(
        &fs::read(mount.path(&format!("{TI2V}/{vae}"))).expect("read through a redirect"),
        &want,
        vae,
    );
    let hub_path = format!("/wan-ai/wan-test/resolve/main/{vae}");
    let redirected = endpoint.gets(&hub_path);
    assert!(
        !redirected.is_empty() && redirected.iter().all(|r| r.status == 302),
        "endpoint requests: {redirected:?}"
    );
    assert!(
        redirected
            .iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {TOKEN}")))
    );
    let followed = cdn.gets(&hub_path);
    assert!(
        !followed.is_empty(),
        "the redirect was not followed to {}",
        cdn.url()
    );
    for r in cdn.requests() {
        assert_eq!(
            r.header("authorization"),
            None,
            "Authorization forwarded to the redirect target: {r:?}"
        );
        assert!(
            r.headers.iter().all(|(_, v)| !v.contains(TOKEN)),
            "the token reached another host: {r:?}"
        );
    }
}

/// A signed URL as a source (`…/base?X-Amz-Signature=…`): each file's path goes before the
/// query, and the signature shows up in no log line, status, event, metric or config view,
/// even when the source fails.
#[test]
fn signed_url_source_works_and_its_secret_never_shows() {
    if no_fuse() {
        return;
    }
    const SECRET: &str = "s1gn4tur3deadbeef";
    let work = workdir();
    let src = work.path().join("src");
    let files = gen_files(
        &src,
        "gen@1.0.0",
        &[("a.bin", 300_000), ("b.bin", 300_000)],
        7,
    );
    let origin = Origin::start(&src);
    let base = format!(
        "{}?X-Amz-Signature={SECRET}&X-Amz-Expires=600",
        origin.base("gen@1.0.0")
    );
    let opts = BuildOpts {
        chunk_size: Some(65536),
        sources: vec![base],
        whole_only: false,
    };
    let entry = manifest_build(&src.join("gen@1.0.0"), "gen@1.0.0", &opts);
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let mut config = test_config();
    config.fetch.retries = 1;
    config.fetch.read_timeout_secs = 2.0;
    let mount = Mount::start(MountSpec::new(work.path(), &manifest).config(config));
    let a = mount.path("gen@1.0.0/a.bin");
    assert_bytes_eq(
        &fs::read(&a).expect("read through a signed-URL source"),
        data_of(&files, "a.bin"),
        "a.bin",
    );
    let paths: Vec<String> = origin
        .gets("a.bin")
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        paths.iter().all(|p| p == "/gen@1.0.0/a.bin"),
        "request paths: {paths:?}"
    );

    // Failures whose messages would carry the request URL: a reset body, then no origin.
    origin.add_fault(Fault::ResetAfter(0), Some("b.bin"), None);
    let b = mount.path("gen@1.0.0/b.bin");
    assert!(fs::read(&b).is_err(), "b.bin read while its source resets");
    drop(origin);
    // Past the failed chunks' memory (cooldown_secs = 1), so this read reaches the network.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(fs::read(&b).is_err(), "b.bin read while its origin is down");
    let mut seen = mount.log();
    for name in ["status", "events", "metrics", "config", "health"] {
        seen += &fs::read_to_string(mount.path(&format!(".wan/{name}"))).unwrap_or_default();
    }
    assert!(
        seen.contains("X-Amz-Signature"),
        "the source is named somewhere"
    );
    assert!(
        !seen.contains(SECRET),
        "the signature leaked:\n{}",
        seen.lines()
            .filter(|l| l.contains(SECRET))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
