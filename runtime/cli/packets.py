"""``skill-edge keys ...`` and ``skill-edge packet inspect``: manage who this device trusts, look inside packets.

Wire into the root command with::

    app.add_typer(keys_app, name="keys")
    app.add_typer(packet_app, name="packet")
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from skill_edge.runtime.cli.output import iso_time, print_json, print_record, print_table
from skill_edge.runtime.exchange.codec import format_size
from skill_edge.runtime.exchange.keys import (
    DEVICE_KEY_FILE,
    DEVICE_PUB_FILE,
    HOME_ENV,
    KeyStoreError,
    TrustStore,
    init_device_key,
    key_dir,
    load_device_key,
    load_public_key,
)
from skill_edge.runtime.exchange.packet import (
    MAX_PACKET_BYTES,
    Packet,
    PacketCodec,
    PacketError,
    check_signature,
    parse_frame,
)

keys_app = typer.Typer(help="This device's signing key and the trust store of peers' public keys.",
                       no_args_is_help=True)
packet_app = typer.Typer(help="Look inside knowledge packets.", no_args_is_help=True)
console = Console(soft_wrap=True, emoji=False)  # a long path stays on one line in a pipe or a log
err = Console(stderr=True, soft_wrap=True, emoji=False)

HomeOption = typer.Option(None, "--home", envvar=HOME_ENV, show_envvar=True,
                          help="skill-edge home (keys/ and trust/ live here); default ~/.skill-edge")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON.")


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@keys_app.command("init")
def keys_init(home: Path | None = HomeOption,
              force: bool = typer.Option(False, "--force", help="replace an existing device key"),
              trust_self: bool = typer.Option(True, "--trust-self/--no-trust-self",
                                              help="also add this device's public key to its trust store as 'self'")) -> None:
    """Create this device's Ed25519 signing key (private key PEM, mode 0600).

    Exits 1, with one line, when a key exists (without --force) or the key cannot be written
    (a full disk, permissions); a key that could not be written whole is not left behind.
    """
    kd = key_dir(home)
    existed = {name: (kd / name).exists() for name in (DEVICE_KEY_FILE, DEVICE_PUB_FILE)}
    try:
        key = init_device_key(home, force=force)
        if trust_self:
            TrustStore.at_home(home).add("self", key.public_key, overwrite=True)
    except KeyStoreError as exc:
        _fail(str(exc))
    except OSError as exc:
        if not any(existed.values()):  # a fresh key half-written (device.pem but no device.pub): remove it
            for name in existed:
                (kd / name).unlink(missing_ok=True)
        _fail(f"cannot write the device key in {kd}: {exc.strerror or exc}"
              + (f" ({exc.filename})" if exc.filename else ""))
    console.print(f"device key [bold]{key.key_id}[/] written to {kd / 'device.pem'}")
    console.print(f"share the public key with peers: {kd / 'device.pub'}  (they run: skill-edge keys add NAME FILE)")


@keys_app.command("add")
def keys_add(name: str = typer.Argument(..., help="a label for the peer, e.g. its agent id"),
             public_key: Path = typer.Argument(..., exists=True, dir_okay=False, help="the peer's device.pub"),
             home: Path | None = HomeOption,
             replace_existing: bool = typer.Option(False, "--replace", help="overwrite a key of the same name")) -> None:
    """Trust packets signed by this public key."""
    try:
        with open(public_key, "rb") as f:
            pub = load_public_key(f.read(16384), source=str(public_key))
        tk = TrustStore.at_home(home).add(name, pub, overwrite=replace_existing)
    except KeyStoreError as exc:
        _fail(str(exc))
    console.print(f"trusted [bold]{tk.name}[/] (key {tk.key_id})")


@keys_app.command("ls")
def keys_ls(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """List this device's key and every trusted key."""
    try:
        dev = load_device_key(home)
        device = {"key_id": dev.key_id, "file": str(key_dir(home) / DEVICE_KEY_FILE), "problem": None}
    except KeyStoreError as exc:
        device = {"key_id": None, "file": None, "problem": str(exc)}
    try:
        keys = TrustStore.at_home(home).keys()
    except KeyStoreError as exc:
        _fail(str(exc))
    if as_json:
        print_json({"device_key": device, "trust_store": str(TrustStore.at_home(home).directory),
                    "trusted": [{"name": k.name, "key_id": k.key_id, "file": str(k.path)} for k in keys]})
        return
    if device["key_id"]:
        console.print(f"device key: [bold]{device['key_id']}[/] ({device['file']})")
    else:
        console.print(f"device key: none ({device['problem']})")
    if not keys:
        console.print("trust store is empty: this device accepts no packets")
        return
    print_table(f"trust store {TrustStore.at_home(home).directory}", ["name", "key id", "file"],
                [[k.name, k.key_id, str(k.path)] for k in keys])


@keys_app.command("rm")
def keys_rm(name: str = typer.Argument(..., help="name or key id of the trusted key"),
            home: Path | None = HomeOption) -> None:
    """Stop trusting a key (packets it signs are rejected from now on)."""
    try:
        k = TrustStore.at_home(home).remove(name)
    except KeyStoreError as exc:
        _fail(str(exc))
    console.print(f"removed [bold]{k.name}[/] (key {k.key_id})")


@packet_app.command("inspect")
def packet_inspect(file: Path = typer.Argument(..., exists=True, dir_okay=False),
                   home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """Show everything in a packet and whether its signature verifies against the trust store.

    Exits 1 when the packet is malformed, unsigned, signed by an unknown key or modified after signing.
    """
    try:
        if file.stat().st_size > MAX_PACKET_BYTES:
            raise PacketError(f"oversized: {file.stat().st_size} bytes, the limit is {MAX_PACKET_BYTES}", "oversized")
        data = file.read_bytes()
        frame = parse_frame(data)
    except PacketError as exc:
        _fail(f"{file}: {exc.reason}")
    except OSError as exc:
        _fail(f"{file}: {exc}")
    # the signature first: if the bytes were modified, that is the finding, whatever else is broken
    signer = frame.key_id.hex() if frame.key_id is not None else "nobody (unsigned)"
    trusted_name = None
    try:
        trusted_name = check_signature(frame, TrustStore.at_home(home)).name
        signature = f"signer: {signer} = trusted key [bold]{trusted_name}[/]; [green]signature verifies[/]"
        signature_problem = None
    except (PacketError, KeyStoreError) as exc:
        signature = f"signer: {signer}; [red]{exc}[/]"
        signature_problem = str(exc)
    try:
        packet = PacketCodec().decode(data)
    except PacketError as exc:
        if not as_json:
            console.print(signature)
        _fail(f"{file}: {signature_problem or exc.reason}" + (f" (and: {exc.reason})" if signature_problem else ""))
    if as_json:
        print_json({**_packet_json(file, packet),
                    "signature": {"signer": frame.key_id.hex() if frame.key_id is not None else None,
                                  "trusted_as": trusted_name, "verifies": signature_problem is None,
                                  "problem": signature_problem}})
    else:
        _show(file, packet)
        console.print(signature)
    if signature_problem:
        _fail(f"{file}: {signature_problem}")


def _packet_json(file: Path, p: Packet) -> dict:
    """What ``packet inspect`` shows, as data."""
    k, plan = p.knowledge, p.plan
    return {"file": str(file), "version": p.version, "bytes": p.raw_size, "task": p.task, "labels": list(p.labels),
            "agent": p.agent_id, "seq": p.seq, "created": iso_time(p.created), "rom_fingerprint": p.rom_fingerprint,
            "bb_layout_hash": p.bb_layout_hash or None, "feature_transform": k.meta.feature_transform,
            "n_train": k.meta.n_train, "metrics": dict(k.meta.metrics), "thresholds": dict(k.thresholds),
            "plan": {"step": plan.step, "lossless": plan.lossless, "compression": plan.compression,
                     "gmmc_k": plan.gmmc_k, "gmmc_k_original": plan.gmmc_k_original,
                     "exemplars_per_class": plan.exemplars_per_class,
                     "exemplars_per_class_original": plan.exemplars_per_class_original,
                     "maha_means": plan.maha_means, "tensors": dict(plan.tensors)},
            "metadata_bytes": p.metadata_bytes, "payload_bytes": p.payload_bytes,
            "payload_raw_bytes": p.payload_raw_bytes, "sha256": p.sha256,
            "tensors": [{"name": t.name, "encoding": plan.tensors.get(t.name), "wire_dtype": t.dtype,
                         "shape": list(t.shape), "bytes": int(t.nbytes)} for t in p.wire_tensors]}


def _show(file: Path, p: Packet) -> None:
    k = p.knowledge
    labels = ", ".join(p.labels[:12]) + (" ..." if len(p.labels) > 12 else "")
    rows = [
        ("task", p.task), ("labels", f"{len(p.labels)}: {labels}"),
        ("agent", p.agent_id), ("seq", str(p.seq)), ("created", iso_time(p.created)),
        ("ROM fingerprint", p.rom_fingerprint), ("BB layout hash", p.bb_layout_hash or "(no BB)"),
        ("feature transform", k.meta.feature_transform), ("n_train", str(k.meta.n_train)),
        ("metrics", ", ".join(f"{a}={b:.4g}" for a, b in k.meta.metrics.items()) or "-"),
        ("thresholds", ", ".join(f"{a}={b:.4g}" for a, b in k.thresholds.items()) or "-"),
        ("plan", p.plan.step + (" (lossless)" if p.plan.lossless else "")),
        ("GMMC components", f"{p.plan.gmmc_k} of {p.plan.gmmc_k_original}" if p.plan.gmmc_k else "-"),
        ("exemplars/class", f"{p.plan.exemplars_per_class} of {p.plan.exemplars_per_class_original}"
         + (" (per merged row)" if p.plan.maha_means else "") if p.plan.exemplars_per_class is not None else "-"),
        ("Mahalanobis mean rows", (f"{p.plan.maha_means} for {len(p.labels)} classes (merged)" if p.plan.maha_means
                                   else "one per class") if k.maha is not None else "-"),
        ("sizes", f"metadata {p.metadata_bytes} B, payload {p.payload_bytes} B on the wire"
                  + (f" (zstd of {p.payload_raw_bytes} B)" if p.compressed else " (not compressed)")),
        ("sha256", p.sha256),
    ]
    print_record(f"{file.name}: skill-edge packet v{p.version}, {p.raw_size} bytes ({format_size(p.raw_size)})",
                 dict(rows))
    print_table("tensors", ["name", "encoding", "wire dtype", "shape", "bytes"],
                [[t.name, p.plan.tensors.get(t.name, "(side data)"), t.dtype, "x".join(map(str, t.shape)), str(t.nbytes)]
                 for t in p.wire_tensors], right=("bytes",))
