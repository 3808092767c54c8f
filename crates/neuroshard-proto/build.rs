//! Compiles `proto/neuroshard.proto` with protox, so builds never need `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{proto_dir}/neuroshard.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([&file], [proto_dir])?;
    tonic_prost_build::configure()
        .bytes(".neuroshard.v1.Tensor.payload")
        .compile_fds(fds)?;
    Ok(())
}
