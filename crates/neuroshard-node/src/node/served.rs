//! The shard a node serves and where its weights come from: the model directory's
//! safetensors, or the shard fetched from a peer and kept there.

use super::*;

/// The shard a node serves, replaced whole when its layers or device change: a call holds the
/// one it was checked against until it ends.
#[derive(Debug)]
pub(super) struct Served {
    pub(super) shard: Mutex<Shard>,
    pub(super) range: LayerRange,
    pub(super) device: Option<ComputeDevice>,
    pub(super) on_gpu: bool,
    /// How the shard holds its projection weights.
    pub(super) precision: Precision,
    /// The shard that computes under [`Fault::WrongWeights`].
    pub(super) wrong_shard: Option<Mutex<Shard>>,
}

/// Where a node's weights come from.
pub(super) enum WeightSource {
    /// The model directory's safetensors files.
    Disk(PathBuf),
    /// A shard's flat parameters, fetched from a peer, of the model described.
    Fetched(Box<ModelInfo>, Vec<f32>),
}

impl WeightSource {
    /// Layers `range` from here on `device`, held at `precision`.
    fn shard(
        self,
        range: LayerRange,
        device: &neuroshard_model::Device,
        precision: Precision,
    ) -> Result<Shard, neuroshard_model::ModelError> {
        let layers = range.to_range();
        match self {
            Self::Disk(dir) => Shard::load_at(&dir, layers, device, precision),
            Self::Fetched(info, values) => {
                Shard::from_parameters_at(*info, layers, device, &values, precision)
            }
        }
    }
}

/// The weights of `range` this machine holds: the model directory's safetensors, or the shard
/// fetched from peers and kept there; none when it holds neither.
pub(super) fn weights_on_disk(
    dir: &Path,
    range: LayerRange,
) -> Result<Option<(ModelInfo, WeightSource)>, NodeError> {
    let model = ModelInfo::read(dir)?;
    if neuroshard_model::has_safetensors(dir)? {
        return Ok(Some((model, WeightSource::Disk(dir.to_path_buf()))));
    }
    let stored = neuroshard_model::fetched::load_shard(dir, &model.config, range.to_range())?;
    Ok(stored.map(|parameters| {
        (
            model.clone(),
            WeightSource::Fetched(Box::new(model), parameters),
        )
    }))
}

impl Served {
    /// Loads `range` of the model from `source` on `device` off the reactor, its projections
    /// held at `precision`, warming a GPU's kernels up, and (for a test node told to) the wrong
    /// weights beside it.
    pub(super) async fn load(
        source: WeightSource,
        range: LayerRange,
        (device, precision): (Option<ComputeDevice>, Precision),
        fault: Option<&Fault>,
    ) -> Result<Self, NodeError> {
        let resolved = match device {
            None => neuroshard_model::default_device(),
            Some(ComputeDevice::Cpu) => neuroshard_model::cpu_device(),
            Some(ComputeDevice::Gpu) => neuroshard_model::gpu_device().ok_or_else(|| {
                NodeError::Device(
                    "gpu asked for, but this build has no GPU backend (build with the `wgpu` \
                     feature)"
                        .into(),
                )
            })?,
        };
        let on_gpu = !neuroshard_model::is_cpu(&resolved);
        let wrong = match fault {
            Some(Fault::WrongWeights(dir)) => Some(dir.clone()),
            _ => None,
        };
        let (shard, wrong_shard) = tokio::task::spawn_blocking(move || {
            let shard = source.shard(range, &resolved, precision)?;
            if on_gpu {
                shard.warm_up()?;
            }
            let wrong = match wrong {
                Some(dir) => {
                    let wrong = WeightSource::Disk(dir).shard(range, &resolved, precision)?;
                    Some(Mutex::new(wrong))
                }
                None => None,
            };
            Ok::<_, neuroshard_model::ModelError>((shard, wrong))
        })
        .await
        .map_err(|e| {
            let why = panic_message(e);
            if on_gpu {
                NodeError::Device(format!("the GPU could not be used: {why}"))
            } else {
                NodeError::Config(format!("loading the shard failed: {why}"))
            }
        })??;
        Ok(Self {
            shard: Mutex::new(shard),
            range,
            device,
            on_gpu,
            precision,
            wrong_shard,
        })
    }
}
