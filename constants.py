"""Every number the wire, the client and the server agree on, in one place.

Sizes are bytes, times are seconds unless the name says otherwise.
"""

from __future__ import annotations

PACKAGE_NAME = "comfyui-mesh"
PACKAGE_VERSION = "0.3.0"

# ---------------------------------------------------------------------------- wire
MAGIC = b"MESH"
# Bumped on any change to the frame layout or to a message's required fields.
# Both sides must speak the same version; the frame decoder names both on mismatch.
PROTOCOL_VERSION = 3

# Frame prefix: magic(4) version(u16) kind(u16) header_len(u32) body_len(u64) crc32(u32).
PREFIX_SIZE = 24
# A header is JSON describing the message and its tensors; even an LTX request with
# 40 tensors and LoRA metadata stays far below this.
MAX_HEADER_BYTES = 1 << 20
# Largest body we will allocate for one frame. An LTX-AV 1280x704x121 seam with CFG is
# ~230 MB raw plus per-generation constants; 3 GiB leaves room without letting a
# garbage length field make us allocate without bound.
MAX_BODY_BYTES = 3 << 30
# A CPU tensor decoded from a received frame starts on this byte boundary (copied if it does not).
DECODE_ALIGN_BYTES = 64
# Frames with a body at least this large are received into page-locked host memory where a
# CUDA GPU will decode them (pageable host-to-GPU copies run at ~6 GB/s on an H200 host,
# page-locked ones at ~50 GB/s); smaller ones into a plain bytearray.
BIG_BODY_BYTES = 1 << 20
# Page-locked receive buffers alive at once, per process (the OS cannot swap them out; torch keeps
# freed blocks for reuse). Beyond this, and for bigger frames, plain bytearrays.
PINNED_RECEIVE_MAX_BYTES = 1 << 30
# Before a client has authenticated it may only send small frames (hello/auth/bye): body and header.
PRE_AUTH_MAX_BODY = 64 << 10
PRE_AUTH_MAX_HEADER = 16 << 10
# Limits on tensor descriptors, checked before anything is allocated.
MAX_TENSORS_PER_FRAME = 256
MAX_TENSOR_NDIM = 8
MAX_NAME_LEN = 128
# Streamed calls (docs/PROTOCOL.md §6.1): a request or reply whose big tensors travel as token slabs in
# FORWARD_CHUNK / RESULT_CHUNK frames before the FORWARD / RESULT that closes it. At most this many
# chunk frames per request and per reply (the receiver refuses more).
MAX_STREAM_PARTS = 64
# Smallest slab size a receiver honours when asked for a streamed reply (a peer cannot ask the server
# to cut its reply into one-byte slabs).
MIN_STREAM_SLAB_BYTES = 64 << 10
# Client defaults: slabs of this many raw bytes (the socket buffers ~4 MB, so one slab is on the wire
# while the next is coded), used when the coded tensors of a call add up to STREAM_MIN_BYTES or more;
# smaller calls stay one frame. ClientConfig.stream_slab_bytes = 0 turns streaming off.
STREAM_SLAB_BYTES = 4 << 20
STREAM_MIN_BYTES = 4 << 20
# What each side pays per MB that crosses, whatever the codec (sealing / opening records, host copies),
# ms: a 37.7 MB raw seam sent as one frame cost ~1.1 ms/MB more than streamed on an H200 host (2.5 GbE:
# +43.8 vs +2.6 ms, docs/BENCHMARKS.md); streaming.pipeline_ms plans slabs with it.
STREAM_SIDE_MS_PER_MB = 0.5
# What each side pays per slab beyond coding it, ms: a chunk frame, a sealed record, a pass through
# the receive loop, a host sync. Without it the plan streamed a GPU entropy coder in 8 slabs at 2.5 GbE
# (+24.9 ms of overhead beyond the wire) where one frame cost +22.2 (one H200, 2026-12-03).
STREAM_SLAB_MS = 1.5

# ---------------------------------------------------------------------------- network
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 7777
CONNECT_TIMEOUT_S = 5.0
# A back-half forward of FLUX.2 Dev on a slow card plus a big first LoRA upload can take
# tens of seconds; a read that waits longer than this means the server is stuck.
READ_TIMEOUT_S = 300.0
# The whole HELLO -> WELCOME exchange, seconds. On the server a deadline counted from accept, however
# the bytes trickle in (not a per-recv timeout); on the client the socket timeout while it runs.
HANDSHAKE_TIMEOUT_S = 10.0
SOCKET_CHUNK = 1 << 20  # recv/send granularity
# A frame's big buffers are written in pieces of this size, so a socket timeout (it bounds one whole
# sendall) catches a stalled link without bounding a big frame's transfer time: 4 MiB within the
# client's LIVENESS_TIMEOUT_S is a link slower than 0.2 MB/s.
SEND_SLICE = 4 << 20
# While the server serves a request (queued for the GPU, decoding, forward, encoding) it sends a PROGRESS
# frame every HEARTBEAT_INTERVAL_S seconds, so a slow step is told apart from a dead server or link.
HEARTBEAT_INTERVAL_S = 5.0
# Client: no frame at all (reply or PROGRESS) for this long while waiting for a reply, or no progress of a
# send for this long, seconds = the server or the link is gone; the call is retried like a dropped
# connection. Several heartbeat intervals, so a loaded server is not taken for a dead one.
LIVENESS_TIMEOUT_S = 20.0
# Client retry of a model call across reconnects (server restart, link drop, silent server): waits
# RETRY_BACKOFF_S seconds before the first reconnect, doubling up to RETRY_BACKOFF_MAX_S, and gives up
# (naming host:port and the fix) once RETRY_BUDGET_S seconds have passed since the call first failed.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
RETRY_BUDGET_S = 60.0
# The server drops an authenticated connection that sends nothing for this long, seconds (frees its slot).
SERVER_IDLE_TIMEOUT_S = 3600.0
# Authenticated sessions served at once (status probes included); one more gets `busy` instead of WELCOME.
# Connections still in the handshake do not count here: they have their own caps below.
MAX_CLIENTS = 16
# Connections still in the handshake (not yet authenticated), all source addresses together / from one
# source address. A new connection over either cap pushes out the oldest unauthenticated one (of its own
# address first), so sockets that never authenticate cannot keep an authenticated client out.
MAX_UNAUTHENTICATED = 64
MAX_UNAUTHENTICATED_PER_ADDRESS = 8
# Log lines about a peer's garbage (bad frames, failed auth, handshake timeouts, evictions), server-wide:
# at most PEER_LOG_LINES per PEER_LOG_INTERVAL_S seconds, then one "suppressed K similar messages" line.
PEER_LOG_LINES = 20
PEER_LOG_INTERVAL_S = 10.0
# After an error frame the server drains what the peer still sends for at most this long, seconds
# (so the kernel does not reset the connection before the peer reads the error), then closes.
LINGER_S = 1.0

# Same-host fast path (samehost.py): the most bytes one side's shared-memory segment may take (a
# message whose payloads need more goes over TCP), and the client's switch ("0" = TCP only).
SAMEHOST_MAX_BYTES = MAX_BODY_BYTES
SAMEHOST_ENV = "COMFYUI_MESH_SAMEHOST"

# ---------------------------------------------------------------------------- auth
TOKEN_BYTES = 32  # random bytes in a generated token (hex on disk: 64 chars)
NONCE_BYTES = 32
TOKEN_ENV = "COMFYUI_MESH_TOKEN"
# The server's identity: random bytes, made on first start and kept in <state dir>/server_id (0600);
# sent as lowercase hex in CHALLENGE, covered by both proofs, pinned by clients per host:port.
SERVER_ID_BYTES = 16
# HELLO names the token it will prove with by a key id: the first hex characters of
# SHA-256("comfyui-mesh|key-id|" + token); "" without a token.
KEY_ID_CHARS = 16
# A running server looks for changes of its named tokens (<state dir>/tokens.json) this often, seconds.
TOKEN_RELOAD_S = 1.0
# "1" (exactly) lets the client accept a server that authenticates but does not encrypt (--no-encrypt)
# on an address other than loopback.
ALLOW_UNENCRYPTED_ENV = "COMFYUI_MESH_ALLOW_UNENCRYPTED"
# The encrypted link (securelink.py): a frame travels as records of at most this many plaintext bytes,
# each sealed with AES-256-GCM (16-byte tag) under a per-direction key and a counter nonce.
RECORD_PLAINTEXT_BYTES = 4 << 20
# "1" (exactly) accepts a different ComfyUI release, torch minor release or back-half fingerprint.
SKEW_ENV = "COMFYUI_MESH_ALLOW_VERSION_SKEW"
# Debug option of Icarus: a path prefix; each remote call then writes the seam tensors it sends
# (before coding) to <prefix>-<name>-<call>.safetensors, for bench/codec_bench.py --file.
SEAM_DUMP_ENV = "COMFYUI_MESH_SEAM_DUMP"
SEAM_DUMP_MAX_CALLS = 64  # per split, so a forgotten variable cannot fill a disk
# Row pipelining (rows.py): a model call of several independent rows (CFG, batch > 1) runs as one-row
# calls, the front half of the next row overlapping this one's link time and back half.
ROW_MODES = ("auto", "on", "off")  # SplitSettings.rows; auto: on unless the same-host fast path carries the seam
# "auto" leaves it off on a link measured faster than this (bytes/s; 40 Gbit/s): the seam's time there is
# negligible next to the model's.
ROW_AUTO_FAST_LINK_BPS = 5e9
ROW_LANES = 2  # rows in flight at once, each on a connection (server session) of its own
ROW_MEMO_KEEP_MAX = 8  # per-row constants the per-generation memo keeps (payload.ConstMemo.keep), at most

# ---------------------------------------------------------------------------- codecs
# nvCOMP ANS chunk: each chunk carries its own frequency tables, so larger chunks cost fewer
# bits; the decoder reads the size from the bitstream. Encoder-side only (not a wire constant).
# Measured on an H200 (Klein 9B seam, quant at cosine 0.995): 64 KiB 3.86 bit/value, 256 KiB
# 3.66, 1 MiB 3.61 (= CPU zstd), 4 MiB 3.61 but slower; entropy stage 0.5 ms either way.
ANS_CHUNK_BYTES = 1 << 20
# Per-channel fidelity of the lossy codecs (``wirecodecs.fidelity``): the floor every channel
# keeps by default, as the SNR of the channel against its own spread (variance over tokens), in
# dB; 27.0 dB = the old whole-tensor default "cosine 0.999" read per standardized channel.
DEFAULT_SNR_DB = 27.0
# A channel whose standard deviation over the tokens is below this (absolute, in the tensor's
# units) counts as constant: it may be sent as its mean alone (its variation is not kept).
MIN_CHANNEL_STD = 1e-6
# Per-channel floors of the fixed-rate codecs (their ``floor_db`` parameter; a channel below its
# floor is sent exactly instead). ``snr_db`` / ``cosine`` set the quant family's rate only.
Q4_SNR_DB = 15.0
CLIP_SPARSE_SNR_DB = 25.0
HEVC_SNR_DB = 20.0
# The ``auto`` codec's link measurement (client side): cached per host:port this long; the
# probe payload size; the rate assumed when nothing could be measured (gigabit Ethernet).
LINK_TTL_S = 600.0
LINK_PROBE_BYTES = 2 << 20
# A link the first probe puts above 2 x LINK_PROBE_BYTES per LINK_PROBE_BIG_MS is probed again with
# a payload that takes about that long (at most LINK_PROBE_MAX_BYTES), and the rate is the slope
# between the two: a 2 MiB probe alone read a 10 GbE link (sealed frames, one H200 host) as 256 MB/s,
# the costs of a frame (sealing, copies, the round trip through both event loops) counted as wire.
LINK_PROBE_BIG_MS = 40.0
LINK_PROBE_MAX_BYTES = 32 << 20
DEFAULT_LINK_BPS = 117e6

# Largest total size, once decoded, of the tensors of one request a server accepts (checked from
# their descriptors before any decoding: a tiny entropy-coded payload can declare a huge tensor).
# The largest real request, an LTX-AV 1280x704x121 seam with CFG plus its constants, is ~0.3 GB.
MAX_DECODED_REQUEST_BYTES = 2 << 30
# Temporal-codec references one connection may hold (all its streams and tensor names); a request
# that would leave more is refused and the connection's references dropped. A real LTX-AV split
# with CFG holds ~0.5 GB.
MAX_CODEC_STATE_BYTES = 2 << 30

# ---------------------------------------------------------------------------- caches
# Per-connection cache of per-generation constants (RoPE tables, masks, forwarded LoRA blobs) on the
# server (a soft limit: the newest constant is kept even when it alone is larger).
SERVER_CONST_CACHE_BYTES = 2 << 30

# ---------------------------------------------------------------------------- server-wide budgets
# What all connections together may make one Daedalus hold (server/budget.py, docs/PROTOCOL.md §3.1);
# checked before allocating. Frames being received (bodies of 1 MiB and more) and the decoded tensors
# of the requests being served: two clients each sending the largest request (~0.3 GB frame + 0.3 GB
# decoded, LTX-AV 1280x704x121 with CFG) use ~1.2 GB.
MAX_INFLIGHT_BYTES = 6 << 30
# Every connection's constants caches together.
MAX_CONST_TOTAL_BYTES = 4 << 30
# Every connection's temporal-codec references together.
MAX_CODEC_STATE_TOTAL_BYTES = 4 << 30
# Forwarded LoRA sets the back half keeps unpacked (on its device), all clients together; a set
# larger than this alone is refused.
MAX_LORA_BYTES = 4 << 30

# glibc's allocator in Daedalus (server/budget.py ``tune_allocator``): blocks of this size and more come
# straight from the OS and go back to it when freed (glibc's default threshold rises up to 32 MiB after
# big frees, and then every frame's buffers stay in the heap), and at most this many malloc arenas (the
# default, 8 per core, keeps per-connection-thread heaps). Measured with bench/fuzz_server.py: peak RSS
# 1202 MB -> 742 MB (budget 957). Overridden by the MALLOC_MMAP_THRESHOLD_ / MALLOC_ARENA_MAX variables.
MALLOC_MMAP_THRESHOLD_BYTES = 256 << 10
MALLOC_ARENAS = 2

# The client name of the node's status probe: Daedalus neither logs nor shows it as a client session.
STATUS_CLIENT_NAME = "icarus-status"

# How a user adds the optional codec libraries (zstandard, PyAV): the README's install line.
CODECS_EXTRA_HINT = 'from ComfyUI/custom_nodes, python -m pip install -e "ComfyUI-Mesh[codecs]"'

# ---------------------------------------------------------------------------- several checkpoints (§5.4)
# One Daedalus may serve several checkpoints (--weights repeated: Wan 2.2's two experts). The client's
# connection pool keeps a session per host:port, lane and model fingerprint, at most this many models
# per host:port and lane (the least recently used beyond it is closed: an old fingerprint after a
# reconfigure is one nobody asks for any more).
MAX_POOLED_MODELS = 4
# Models of CHALLENGE.models a client reads (names them in a mismatch error); the rest are ignored.
MAX_LISTED_MODELS = 16

# ---------------------------------------------------------------------------- balance (n_blocks_remote suggestion)
# balance.py suggests another n_blocks_remote only when its estimated step is at least this fraction
# faster than the current one (hysteresis: estimates from one run are noisy; no flip-flopping).
BALANCE_MIN_GAIN = 0.05
# Remote calls a generation needs before a suggestion is made (the first one carries the constants
# and warms kernels up and is left out when there are more).
BALANCE_MIN_CALLS = 2
# Per-call timings a SplitRun keeps for the suggestion (the newest; a ComfyUI without OUTER_SAMPLE never
# ends a generation, so they would grow without bound).
BALANCE_MAX_CALLS = 512

# ---------------------------------------------------------------------------- displaced patch pipelining
# patchpipe.py, docs/PROTOCOL.md §6.3. The node's choices of patches per model call ("off": exact);
# model calls of a generation run exact (and fill the stale K/V) before the first patched one.
PATCH_CHOICES = ("off", "2", "4", "8")
PATCH_WARMUP_CALLS = 2
PATCH_MAX_COUNT = 64  # patches per call a request may name (FORWARD scalar ``patch``)
PATCH_MAX_TOKENS = 1 << 22  # image tokens of one call a request may name
# The stale K/V Daedalus keeps for pipelined generations, all clients together (--max-patch-kv-mb):
# Klein 9B's 24 single blocks at 1024x1024 (4096 image tokens, bf16, width 4096) take ~1.6 GB.
MAX_PATCH_KV_BYTES = 8 << 30

# Icarus splits /mesh/status reports per node (ui_events.record_split): the newest this many nodes.
MAX_RECORDED_SPLITS = 256
