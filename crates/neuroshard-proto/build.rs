//! Compiles `proto/neuroshard.proto` with protox, so builds never need `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!: cargo reuses a build script compiled in another
    // checkout of the workspace (a shared target dir), and a baked path would point there.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = format!("{manifest_dir}/../../proto");
    let file = format!("{proto_dir}/neuroshard.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([&file], [&proto_dir])?;
    tonic_prost_build::configure()
        .bytes(".neuroshard.v1.Tensor.payload")
        .codec_path("crate::checked::CheckedCodec")
        .compile_fds(fds)?;
    Ok(())
}
