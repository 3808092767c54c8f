//! Starting a node: load the shard (from disk or a peer), bind, test reachability, join the
//! DHT and the tracker, and spawn the tasks tied to the handle's cancellation token.

use super::*;

/// Loads the shard, binds, registers with the tracker (if any) and starts serving.
pub async fn start_node(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    config.validate()?;
    let range = config.layers;
    let (model, source, fetched) = find_weights(&config).await?;
    let fault = config.fault();
    let held = (config.device, config.precision);
    let served = Served::load(source, range, held, fault.as_ref()).await?;
    let (key, ledger) = open_identity(&config)?;
    let (listener, addr, advertise) = bind(&config).await?;
    let id = key.id();
    let cancel = CancellationToken::new();
    // Whatever started stops again if the node fails to start.
    let stop_on_error = cancel.clone().drop_guard();
    let (stun, relay, relay_addr) = start_side_servers(&config, addr, &advertise, &cancel).await?;
    let metrics = Arc::new(Metrics::default());
    // One certificate for every connection the node dials: peers know which node called.
    let dialler = neuroshard_net::tls::Dialler::new(&key)?;
    let pool = node_pool(&dialler, &metrics);
    let discovery = start_discovery(&config, &advertise, &key, pool, cancel.clone()).await?;
    let trainer = start_trainer(&config, &model.id, key.id(), &dialler, &metrics)?;
    let record = own_record(
        &key,
        &model,
        range,
        &advertise,
        (relay_addr, config.precision),
    );
    let parts = Parts {
        record,
        advertise,
        served,
        model,
        metrics,
        key,
        ledger,
        discovery,
        cancel: cancel.clone(),
        fault,
        trainer,
    };
    let state = Arc::new(NodeState::new(&config, parts)?);
    state.measure_decode_speed().await;
    tokio::spawn(sweep_sessions(
        state.clone(),
        config.session_idle / 4,
        cancel.clone(),
    ));
    let (circuits, relayed) = tokio::sync::mpsc::channel(16);
    let server = serve(&state, listener, relayed, config.server, &cancel)?;
    state
        .test_reachability(&config, addr.port(), circuits)
        .await;
    state.follow_tracker(config.tracker.clone()).await?;
    tokio::spawn(run_discovery(state.clone(), cancel.clone()));
    tracing::info!(%addr, layers = %range, id = %id.short(), "node serving");
    stop_on_error.disarm();
    Ok(NodeHandle {
        id,
        addr,
        stun,
        relay,
        state,
        cancel,
        server,
        fetched,
    })
}

/// The shard's weights: on disk, else fetched from `weights_from` (and kept for next time).
async fn find_weights(
    config: &NodeConfig,
) -> Result<(ModelInfo, WeightSource, Option<TransferReport>), NodeError> {
    let range = config.layers;
    let on_disk = if config.weights_from.is_some() && !config.model_dir.join("config.json").exists()
    {
        Ok(None)
    } else {
        weights_on_disk(&config.model_dir, range)
    };
    let (model, source, fetched) = match (on_disk, &config.weights_from) {
        (Ok(Some((model, source))), _) => (model, source, None),
        (Ok(None), None) => {
            return Err(NodeError::Config(format!(
                "{} holds neither safetensors weights nor the fetched weights of layers {range}; \
                 fetch them from a peer with weights_from",
                config.model_dir.display()
            )));
        }
        (Err(e), None) => return Err(e),
        (stored, Some(peer)) => {
            if let Err(e) = stored {
                tracing::warn!("fetching the weights again: {e}");
            }
            let (model, checkpoint, report) = fetch_weights(
                peer,
                &config.model_dir,
                range,
                log_fetch_progress(peer, range),
            )
            .await?;
            let source = WeightSource::Fetched(Box::new(model.clone()), checkpoint.parameters);
            (model, source, Some(report))
        }
    };
    Ok((model, source, fetched))
}

/// The node's key and receipt ledger: kept in the data dir, or fresh and in memory.
fn open_identity(config: &NodeConfig) -> Result<(Arc<NodeKey>, LedgerHandle), NodeError> {
    let (key, mut ledger) = match (&config.data_dir, &config.key) {
        (Some(_), Some(_)) => {
            return Err(NodeError::Config(
                "key: a node with a data directory keeps its key there; give one or the other"
                    .into(),
            ));
        }
        (Some(dir), None) => (
            Arc::new(crate::identity::load_or_create(dir)?),
            Ledger::open(&dir.join(LEDGER_FILE))?,
        ),
        (None, key) => (
            key.clone().unwrap_or_else(|| Arc::new(NodeKey::generate())),
            Ledger::in_memory()?,
        ),
    };
    ledger.set_issuers(&config.trusted_issuers())?;
    let retention = (config.ledger_retention_days > 0).then_some(config.ledger_retention_days);
    Ok((key, LedgerHandle::spawn(ledger, retention)?))
}

/// A connection pool reporting into `metrics` that dials as `dialler`.
fn node_pool(
    dialler: &neuroshard_net::tls::Dialler,
    metrics: &Arc<Metrics>,
) -> Arc<ConnectionPool> {
    let pool = Arc::new(ConnectionPool::new(
        PoolConfig::default(),
        metrics.clone(),
        dialler.clone(),
    ));
    pool.spawn_reaper();
    pool
}

/// The trainer of a node started with training on, once it is checked to belong to the run
/// its config names (without one, the log says that the node trains for anyone).
fn start_trainer(
    config: &NodeConfig,
    model_id: &str,
    id: NodeId,
    dialler: &neuroshard_net::tls::Dialler,
    metrics: &Arc<Metrics>,
) -> Result<Option<training::Trainer>, NodeError> {
    let Some(train) = &config.train else {
        return Ok(None);
    };
    match train.run.as_deref() {
        Some(run) => training::check_membership(run, model_id, config.layers, id)?,
        None => tracing::warn!(
            "training without a run manifest: any key may send microbatches, exchanges and checkpoints"
        ),
    }
    let pool = node_pool(dialler, metrics);
    Ok(Some(training::Trainer::new(train.clone(), pool)))
}

/// Binds the listen address; the listener, its address, and the address peers are told.
async fn bind(
    config: &NodeConfig,
) -> Result<(tokio::net::TcpListener, SocketAddr, String), NodeError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| NodeError::io(format!("binding {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError::io("local address", e))?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        // Bound to every interface: the one the routing table uses toward the internet (no
        // packet is sent), which is what peers on the LAN or through a router reach; loopback
        // on a machine with no route out.
        let ip = if addr.ip().is_unspecified() {
            neuroshard_nat::local_ip_toward(([192, 0, 2, 1], 9).into())
                .map_or_else(|_| "127.0.0.1".to_string(), |ip| ip.to_string())
        } else {
            addr.ip().to_string()
        };
        format!("{ip}:{}", addr.port())
    });
    Ok((listener, addr, advertise))
}

/// The STUN answerer on the node's port and the relay it offers, where configured; with the
/// relay's address as announced.
async fn start_side_servers(
    config: &NodeConfig,
    addr: SocketAddr,
    advertise: &str,
    cancel: &CancellationToken,
) -> Result<(Option<SocketAddr>, Option<Relay>, String), NodeError> {
    let stun = if config.stun {
        match neuroshard_nat::stun::Server::start(addr, cancel.clone()).await {
            Ok(server) => Some(server.addr()),
            Err(e) => {
                tracing::warn!("not answering STUN: {e}");
                None
            }
        }
    } else {
        None
    };
    let relay = match &config.serve_relay {
        Some(serve) => Some(
            Relay::start(serve.listen, serve.config, cancel.clone())
                .await
                .map_err(|e| NodeError::Config(format!("serve_relay: {e}")))?,
        ),
        None => None,
    };
    let relay_addr = relay.as_ref().map_or_else(String::new, |r| {
        let host = advertise.rsplit_once(':').map_or(advertise, |(h, _)| h);
        format!("{host}:{}", r.addr().port())
    });
    Ok((stun, relay, relay_addr))
}

/// The record the node announces of itself: with the relay it runs and its weights'
/// precision.
fn own_record(
    key: &NodeKey,
    model: &ModelInfo,
    range: LayerRange,
    advertise: &str,
    (relay, precision): (String, Precision),
) -> PeerRecord {
    PeerRecord {
        node_id: key.id(),
        addr: advertise.to_string(),
        model_id: model.id.clone(),
        layers: range,
        total_layers: model.config.num_hidden_layers as u32,
        load: 0.0,
        public_key: key.public(),
        display_name: String::new(),
        relay,
        precision,
        decode_ms_per_layer: 0.0,
    }
}

/// What a node's state is built from, beside its config.
struct Parts {
    record: PeerRecord,
    advertise: String,
    served: Served,
    model: ModelInfo,
    metrics: Arc<Metrics>,
    key: Arc<NodeKey>,
    ledger: LedgerHandle,
    discovery: Discovery,
    cancel: CancellationToken,
    fault: Option<Fault>,
    trainer: Option<training::Trainer>,
}

/// Bytes of a Forward or Backward request beside its hidden states: ids, the receipt's
/// proof fields, token ids, gRPC framing. 1 MiB, well over what they take.
const CALL_FRAMING_BYTES: usize = 1 << 20;

/// Serves the node's gRPC services (and the DHT) on `listener` and on relayed circuits.
fn serve(
    state: &Arc<NodeState>,
    listener: tokio::net::TcpListener,
    relayed: tokio::sync::mpsc::Receiver<tokio::io::DuplexStream>,
    limits: neuroshard_net::ServerLimits,
    cancel: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, NodeError> {
    let tls =
        neuroshard_net::tls::server_config(&neuroshard_net::tls::TlsIdentity::new(&state.key)?)?;
    let service = NodeServer::new(NodeService {
        state: state.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(service)
        .add_service(DhtService::server(state.discovery.dht().clone()));
    // Forward and Backward carry at most a call's tokens of this model's hidden states in
    // f32, and their framing (session, receipt, proof): sized from the model, not the
    // 101 MiB message cap every method has.
    let hidden = MAX_TOKENS_PER_CALL * state.model.config.hidden_size * 4;
    let call_cap = hidden.saturating_add(CALL_FRAMING_BYTES);
    let with = neuroshard_net::ServeWith {
        tls,
        caps: state.caps.clone(),
        limits,
        body_caps: vec![
            ("/neuroshard.v1.Node/Forward", call_cap),
            ("/neuroshard.v1.Node/Backward", call_cap),
        ],
        name: "node",
    };
    Ok(neuroshard_net::spawn_server(
        routes,
        listener,
        Some(relayed),
        with,
        cancel.clone(),
    ))
}

impl NodeState {
    /// Measures the served shard's decode speed, the figure the node announces; a failure is
    /// logged and leaves it unmeasured (0) until calls are served.
    async fn measure_decode_speed(self: &Arc<Self>) {
        let state = self.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let served = state.served();
            let shard = served.shard.lock_or_recover();
            let layers = served.range.to_range();
            state.decode_speed.measure(&shard, layers, &state.threads)
        })
        .await;
        match measured {
            Ok(Ok(ms)) => tracing::info!("decode compute: {ms:.3} ms per token per layer"),
            Ok(Err(e)) => tracing::warn!("measuring the decode speed failed: {e}"),
            Err(e) => tracing::warn!("measuring the decode speed failed: {e}"),
        }
    }

    /// The state of a node about to serve.
    fn new(config: &NodeConfig, parts: Parts) -> Result<Self, NodeError> {
        let initial = match config.start_paused {
            true => RunState::Paused,
            false => RunState::Serving,
        };
        let testing = "Reachability is being tested.";
        let kv_bytes = parts
            .served
            .shard
            .lock_or_recover()
            .kv_bytes_per_token_layer();
        Ok(NodeState {
            sessions: SessionStore::new(SessionLimits {
                budget_bytes: config.kv_budget_bytes,
                idle_timeout: config.session_idle,
                bytes_per_token_layer: kv_bytes as u64,
                block_positions: neuroshard_model::BLOCK_POSITIONS,
            }),
            record: parts.record,
            display_name: RwLock::new(config.display_name.clone().unwrap_or_default()),
            reachability: tokio::sync::watch::channel(Reachability::untested(
                &parts.advertise,
                testing,
            ))
            .0,
            advertised: RwLock::new(parts.advertise),
            kept: tokio::sync::Mutex::new(Default::default()),
            served: RwLock::new(Arc::new(parts.served)),
            resharding: tokio::sync::Mutex::new(()),
            model_dir: config.model_dir.clone(),
            model: parts.model,
            metrics: parts.metrics,
            peers: RwLock::new(KnownPeers::default()),
            busy: AtomicUsize::new(0),
            lifecycle: Lifecycle::new(initial),
            caps: BandwidthCaps::new(config.upload_kbps, config.download_kbps),
            duty: DutyCycle::new(config.compute_share_percent),
            batcher: Default::default(),
            batching: config.batching,
            threads: ComputeThreads::new(config.cpu_threads)?,
            decode_speed: Default::default(),
            key: parts.key,
            ledger: parts.ledger,
            discovery: parts.discovery,
            beat_now: tokio::sync::watch::channel(0).0,
            told: tokio::sync::watch::channel(None).0,
            tracker: tokio::sync::Mutex::new(None),
            heartbeat_every: config.heartbeat,
            cancel: parts.cancel,
            fault: parts.fault,
            trainer: parts.trainer,
            weights_snapshot: Mutex::new(None),
            checkpoint_streams: neuroshard_base::quota::Quota::new(
                "checkpoint streams",
                checkpoint::MAX_STREAMS,
                checkpoint::MAX_STREAMS_PER_IP,
            ),
        })
    }
}

/// Logs a weights transfer from `peer` at every tenth of the way.
pub(super) fn log_fetch_progress(peer: &str, layers: LayerRange) -> impl FnMut(Progress) + use<> {
    let peer = peer.to_string();
    let mut shown = None;
    move |p: Progress| {
        let tenth = p.done * 10 / p.total.max(1);
        if shown != Some(tenth) {
            shown = Some(tenth);
            tracing::info!(
                "fetching the weights of layers {layers} from {peer}: {}% ({:.1} of {:.1} MB)",
                tenth * 10,
                p.done as f64 / 1e6,
                p.total as f64 / 1e6
            );
        }
    }
}

/// The node's DHT: serving at its advertised address where that resolves to an `ip:port`, else
/// taking part as a client only.
pub(super) async fn start_discovery(
    config: &NodeConfig,
    advertise: &str,
    key: &Arc<NodeKey>,
    pool: Arc<ConnectionPool>,
    cancel: CancellationToken,
) -> Result<Discovery, NodeError> {
    let resolved = tokio::net::lookup_host(advertise)
        .await
        .ok()
        .and_then(|mut addrs| addrs.find(|a| !a.ip().is_unspecified() && a.port() != 0));
    if resolved.is_none() {
        tracing::warn!(
            "{advertise} does not resolve to an ip:port: taking part in the DHT as a client"
        );
    }
    let local = Contact {
        key: Key::of_node(&key.id()),
        addr: resolved.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    Discovery::start(
        local,
        resolved.map(|_| key.clone()),
        config.discovery.clone(),
        config.bootstrap.clone(),
        pool,
        cancel,
    )
}

/// Joins the DHT, keeps the node's records announced, and re-reads its model's providers every
/// sweep (joining again when the table has emptied or the LAN names someone new), until
/// cancelled.
pub(super) async fn run_discovery(state: Arc<NodeState>, cancel: CancellationToken) {
    let discovery = &state.discovery;
    let join_then_keep_up = async {
        // Referrals are unsigned: they only lead into the DHT, whose signed records name the
        // peers this node hands out in turn.
        discovery.join(&state.known_peers()).await;
        let announcing = discovery.keep_announcing(
            &state.key,
            || state.announcement(),
            state.lifecycle.watch(),
            cancel.clone(),
        );
        tokio::join!(announcing, sweep_providers(&state));
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = join_then_keep_up => {}
    }
}

/// Reads the node's model's providers from the DHT now and every sweep, joining again first
/// when the routing table has emptied or the LAN named someone new; forever.
pub(super) async fn sweep_providers(state: &NodeState) {
    let discovery = &state.discovery;
    let mut lan = discovery.lan().map(|lan| lan.count());
    loop {
        let providers = discovery
            .providers(&state.model.id, state.record.total_layers)
            .await;
        state.learn_peers(PeerSource::Dht, providers, None);
        let lan_changed = async {
            match &mut lan {
                Some(count) => count.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let rejoin = tokio::select! {
            _ = tokio::time::sleep(discovery.config().sweep_every) => false,
            true = lan_changed => true,
        };
        if rejoin || discovery.dht().stats().borrow().contacts == 0 {
            discovery.join(&state.known_peers()).await;
        }
    }
}

pub(super) async fn sweep_sessions(
    state: Arc<NodeState>,
    period: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                let expired = state.sessions.expire(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "expired idle sessions");
                }
            }
        }
    }
}

/// Peers the reachability test may ask: the tracker's list and the bootstrap peers.
pub(super) async fn reach_candidates(config: &NodeConfig) -> Vec<PeerRecord> {
    let mut peers = Vec::new();
    if let Some(url) = &config.tracker {
        match neuroshard_client::tracker_client(url) {
            Ok(tracker) => match neuroshard_client::list_peers(tracker, url, None).await {
                Ok(listed) => peers.extend(listed),
                Err(e) => tracing::warn!("reachability: listing the tracker's peers: {e}"),
            },
            Err(e) => tracing::warn!("reachability: {e}"),
        }
    }
    for addr in &config.bootstrap {
        let pinged = async {
            neuroshard_net::convert::peer_from_proto(
                crate::reach::ping(&Target::any(addr.as_str())).await?,
            )
        };
        match tokio::time::timeout(Duration::from_secs(5), pinged).await {
            Ok(Ok(peer)) => peers.push(peer),
            Ok(Err(e)) => tracing::warn!("reachability: bootstrap peer {addr}: {e}"),
            Err(_) => tracing::warn!("reachability: bootstrap peer {addr} did not answer"),
        }
    }
    peers
}
