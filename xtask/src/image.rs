//! `cargo xtask image`: the agent image, built offline (no base image, no
//! registry): see `xlb_tests::image`.

use anyhow::Context as _;
use xlb_tests::image::{self, Contents, DEVELOPMENT_KUSTOMIZATION};

use crate::build::{self, cargo, check_status};

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Build the binaries with the release profile (what a cluster should
    /// run); without it, the debug binaries the tests use.
    #[arg(long)]
    release: bool,
    /// The image reference [default: the development overlay's
    /// newName:newTag, localhost:5000/xlb:dev].
    #[arg(long, value_name = "NAME:TAG")]
    tag: Option<String>,
}

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    let profile = if args.release { "release" } else { "debug" };
    println!("xtask: cargo build ({profile}) of xlb and xlb-echo");
    let mut command = cargo();
    command.args(["build", "-p", "lb-userspace", "-p", "xlb-echo"]);
    if args.release {
        command.arg("--release");
    }
    check_status(&mut command, "cargo build")?;
    let target = build::target_dir()?;
    let contents = Contents {
        xlb: target.join(profile).join("xlb"),
        echo: target.join(profile).join("xlb-echo"),
    };
    let tag = match &args.tag {
        Some(tag) => tag.clone(),
        None => image::overlay_image(DEVELOPMENT_KUSTOMIZATION)?,
    };
    let scratch = target.join("xlb-image");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    println!("xtask: podman build {tag} (FROM scratch, offline)");
    let id = image::build(&contents, &tag, &scratch)?;
    println!("xtask: built {tag} ({id})");
    println!(
        "xtask: to a cluster: `podman push {tag}` (or `podman save {tag} | ...` into kind/k3d), then `kubectl apply -k deploy/overlays/development`"
    );
    Ok(())
}
