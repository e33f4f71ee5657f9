"""A small kustomize for CI: renders deploy/k8s/ offline, where no kustomize binary exists.

It implements the subset of the kustomization format that deploy/k8s/ uses, the way
kustomize (v5) does it, and refuses everything else by name, so a kustomization that grows a
feature this file does not know fails here instead of rendering something kustomize would
not:

- `resources`: YAML files (inside the kustomization's directory) and directories holding a
  kustomization (anywhere, like kustomize's bases); a resource id (apiVersion, kind,
  namespace, name) may be added once only.
- `configMapGenerator`: `files` (`key=path` or `path`) and `literals`, with
  `disableNameSuffixHash: true` (in `options` or `generatorOptions`): the hashed names that
  kustomize gives generated ConfigMaps by default are not reproduced, so they are refused.
- `patches`: strategic-merge patches, one document each (`path:` or inline `patch:`), whose
  target is the resource with the patch's apiVersion, kind, name and namespace, current or
  original (a patch without a namespace still finds a resource a base has moved into one,
  as kustomize does). Built-in kinds merge lists by their merge keys (containers by name,
  volumeMounts by mountPath, ...); custom resources, which kustomize merges without a
  schema, get a JSON merge patch (lists replaced whole). `null` deletes a key,
  `$patch: delete` deletes a list item or a whole resource, `$patch: replace` replaces a map.
- `namespace`, `labels` (`pairs`, `includeTemplates`; not `includeSelectors`) and `images`
  (`newName`, `newTag`, `digest`).
- Files outside a kustomization's directory are refused, as by kustomize's default
  `--load-restrictor LoadRestrictionsRootOnly`; `render(..., load_restrictor="none")` is
  `--load-restrictor LoadRestrictionsNone`.

`python -m tests.deploy.k8s_render DIR [--load-restrictor none]` prints what `kustomize build`
would (resources in the order they were added, not kustomize's kind order).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_KEYS = frozenset({"apiVersion", "kind", "resources", "namespace", "labels", "patches",
                        "configMapGenerator", "generatorOptions", "images"})
# Kinds whose objects have no namespace (only those that could plausibly appear here).
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                            "PersistentVolume", "CustomResourceDefinition", "PriorityClass",
                            "RuntimeClass", "ClusterTriggerAuthentication"})
# Strategic-merge keys of the lists that Kubernetes' own types merge instead of replacing
# (from their patchMergeKey tags); every other list is replaced whole.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "env": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "imagePullSecrets": "name", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name", "volumeDevices": "devicePath",
}


class KustomizeError(ValueError):
    """A kustomization this renderer (or kustomize) would not build; says which and why."""


@dataclass
class Resource:
    """One object and every id it has had (kustomize matches patches against all of them)."""

    obj: dict[str, Any]
    ids: list[tuple[str, str, str | None, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids.append(self.current_id())

    def current_id(self) -> tuple[str, str, str | None, str]:
        meta = self.obj.get("metadata") or {}
        return (self.obj.get("apiVersion", ""), self.obj.get("kind", ""),
                meta.get("namespace"), meta.get("name", ""))

    def renamed(self) -> None:
        """Record the current id after a transformer changed it."""
        if self.current_id() not in self.ids:
            self.ids.append(self.current_id())


def render(directory: str | Path, *, load_restrictor: str = "rootOnly") -> list[dict[str, Any]]:
    """The resources `kustomize build DIRECTORY` makes, as dicts."""
    if load_restrictor not in ("rootOnly", "none"):
        raise KustomizeError(f"load_restrictor must be 'rootOnly' or 'none', not "
                             f"{load_restrictor!r}")
    return [r.obj for r in _build(Path(directory).resolve(), load_restrictor, ())]


def dump(resources: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(resources, sort_keys=False, default_flow_style=False)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of `path`; each must be a Kubernetes object."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
            raise KustomizeError(f"{path}: every document must be an object with apiVersion, "
                                 "kind and metadata")
    return docs


# -- building ------------------------------------------------------------------------------

def _kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            data = yaml.safe_load((directory / name).read_text()) or {}
            if not isinstance(data, dict):
                raise KustomizeError(f"{directory / name}: not a mapping")
            unknown = sorted(set(data) - KNOWN_KEYS)
            if unknown:
                raise KustomizeError(f"{directory / name}: {', '.join(unknown)} not supported "
                                     "by this renderer (tests/deploy/k8s_render.py)")
            kind = data.get("kind", "Kustomization")
            if kind != "Kustomization":
                raise KustomizeError(f"{directory / name}: kind {kind} not supported")
            return data
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _inside(root: Path, path: Path, restrictor: str, what: str) -> Path:
    path = path.resolve()  # symlinks too: kustomize checks where a file really is
    if restrictor == "rootOnly" and not path.is_relative_to(root):
        raise KustomizeError(f"security; file '{path}' is not in or below '{root}' ({what}; "
                             "kustomize refuses it unless --load-restrictor "
                             "LoadRestrictionsNone)")
    if not path.exists():
        raise KustomizeError(f"{what}: {path} does not exist")
    return path


def _build(root: Path, restrictor: str, stack: tuple[Path, ...]) -> list[Resource]:
    if root in stack:
        raise KustomizeError(f"cycle: {' -> '.join(map(str, (*stack, root)))}")
    k = _kustomization(root)
    resources: list[Resource] = []
    for entry in k.get("resources") or []:
        if "://" in entry or entry.startswith("git@"):
            raise KustomizeError(f"{root}: remote resource {entry!r} not supported (offline)")
        target = (root / entry).resolve()
        if target.is_dir():
            loaded = _build(target, restrictor, (*stack, root))
        else:
            target = _inside(root, root / entry, restrictor, "resources")
            loaded = [Resource(doc) for doc in load_documents(target)]
        for resource in loaded:
            _add(resources, resource, root)
    for resource in _generate(root, k, restrictor):
        _add(resources, resource, root)
    for entry in k.get("patches") or []:
        _patch(resources, _patch_document(root, entry, restrictor), root)
    if "namespace" in k:
        for resource in resources:
            if resource.obj["kind"] not in CLUSTER_SCOPED:
                resource.obj["metadata"]["namespace"] = k["namespace"]
                resource.renamed()
    for entry in k.get("labels") or []:
        _label(resources, entry, root)
    for entry in k.get("images") or []:
        _set_image(resources, entry, root)
    return resources


def _add(resources: list[Resource], resource: Resource, root: Path) -> None:
    if any(r.current_id() == resource.current_id() for r in resources):
        raise KustomizeError(f"{root}: may not add resource with an already registered id: "
                             f"{resource.current_id()}")
    resources.append(resource)


def _generate(root: Path, k: dict[str, Any], restrictor: str) -> list[Resource]:
    defaults = k.get("generatorOptions") or {}
    out = []
    for gen in k.get("configMapGenerator") or []:
        unknown = sorted(set(gen) - {"name", "namespace", "files", "literals", "options",
                                     "behavior"})
        if unknown or gen.get("behavior", "create") != "create":
            raise KustomizeError(f"{root}: configMapGenerator {gen.get('name')}: "
                                 f"{', '.join(unknown) or 'behavior'} not supported")
        options = {**defaults, **(gen.get("options") or {})}
        if not options.get("disableNameSuffixHash"):
            raise KustomizeError(f"{root}: configMapGenerator {gen['name']}: set "
                                 "options.disableNameSuffixHash: true (hashed names are not "
                                 "rendered here)")
        data: dict[str, str] = {}
        for spec in gen.get("files") or []:
            key, _, rel = spec.rpartition("=") if "=" in spec else ("", "", spec)
            path = _inside(root, root / rel, restrictor, f"configMapGenerator {gen['name']}")
            data[key or path.name] = path.read_text()
        for literal in gen.get("literals") or []:
            key, sep, value = literal.partition("=")
            if not sep:
                raise KustomizeError(f"{root}: literal {literal!r} is not KEY=VALUE")
            data[key] = value
        meta: dict[str, Any] = {"name": gen["name"]}
        if gen.get("namespace"):
            meta["namespace"] = gen["namespace"]
        for part in ("labels", "annotations"):
            if options.get(part):
                meta[part] = dict(options[part])
        out.append(Resource({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                             "data": data}))
    return out


def _patch_document(root: Path, entry: dict[str, Any], restrictor: str) -> dict[str, Any]:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise KustomizeError(f"{root}: patches entry {entry!r}: only one of path or patch "
                             "(a strategic-merge patch naming its target) is supported")
    if "path" in entry:
        path = _inside(root, root / entry["path"], restrictor, "patches")
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        where = str(path)
    else:
        docs = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
        where = f"{root} (inline patch)"
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise KustomizeError(f"{where}: a patch must be exactly one YAML mapping")
    doc = docs[0]
    meta = doc.get("metadata") or {}
    if not all(isinstance(v, str) and v for v in (doc.get("apiVersion"), doc.get("kind"),
                                                  meta.get("name"))):
        raise KustomizeError(f"{where}: a strategic-merge patch needs apiVersion, kind and "
                             "metadata.name to find its target")
    return doc


def _patch(resources: list[Resource], patch: dict[str, Any], root: Path) -> None:
    meta = patch["metadata"]
    wanted = (patch["apiVersion"], patch["kind"], meta.get("namespace"), meta["name"])
    matches = [r for r in resources if wanted in r.ids]
    if len(matches) != 1:
        raise KustomizeError(f"{root}: {'no' if not matches else 'multiple'} matches for Id "
                             f"{wanted}; failed to find unique target for patch")
    target = matches[0]
    if patch.get("$patch") == "delete":
        resources.remove(target)
        return
    builtin = is_builtin(patch["apiVersion"])
    target.obj = merge(target.obj, patch, strategic=builtin)
    target.renamed()


def is_builtin(api_version: str) -> bool:
    """Kubernetes' own API groups: core (`v1`) and groups without a dot or under k8s.io."""
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


def merge(base: Any, patch: Any, *, strategic: bool, key: str | None = None) -> Any:
    """`patch` applied to `base` (neither is changed): strategic merge if `strategic`, else
    a JSON merge patch (RFC 7386). `key` is the field name `base` sits under."""
    if isinstance(patch, dict):
        if not isinstance(base, dict) or patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for name, value in patch.items():
            if name.startswith("$"):
                if name != "$patch" or value not in ("merge", "replace", "delete"):
                    raise KustomizeError(f"directive {name}: {value!r} not supported")
                continue
            if value is None:
                out.pop(name, None)
            else:
                out[name] = merge(out.get(name), value, strategic=strategic, key=name)
        return out
    if isinstance(patch, list) and strategic and key in MERGE_KEYS and isinstance(base, list):
        return _merge_list(base, patch, MERGE_KEYS[key])
    if isinstance(patch, list) and any(isinstance(i, dict) and "$patch" in i for i in patch):
        raise KustomizeError(f"{key}: $patch directives only work in lists with a merge key")
    return copy.deepcopy(patch)


def _merge_list(base: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    out = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"list item {item!r} has no merge key {merge_key!r}")
        where = next((i for i, old in enumerate(out)
                      if isinstance(old, dict) and old.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if where is not None:
                del out[where]
        elif where is None:
            out.append(merge(None, item, strategic=True))
        else:
            out[where] = merge(out[where], item, strategic=True)
    return out


# -- transformers --------------------------------------------------------------------------

def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload (Deployment-like templates, Jobs, CronJobs, Pods)."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return [spec]
    if obj.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    template = spec.get("template")
    return [template.setdefault("spec", {})] if isinstance(template, dict) else []


def _label(resources: list[Resource], entry: dict[str, Any], root: Path) -> None:
    unknown = sorted(set(entry) - {"pairs", "includeTemplates", "includeSelectors"})
    if unknown or entry.get("includeSelectors"):
        raise KustomizeError(f"{root}: labels {', '.join(unknown) or 'includeSelectors'} not "
                             "supported (selectors are written out in the manifests)")
    pairs = {str(k): str(v) for k, v in (entry.get("pairs") or {}).items()}
    for resource in resources:
        resource.obj["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates"):
            spec = resource.obj.get("spec") or {}
            if resource.obj["kind"] == "CronJob":
                spec = (spec.get("jobTemplate") or {}).get("spec") or {}
            if isinstance(spec.get("template"), dict):
                spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(
                    pairs)


def _set_image(resources: list[Resource], entry: dict[str, Any], root: Path) -> None:
    unknown = sorted(set(entry) - {"name", "newName", "newTag", "digest"})
    if unknown or "name" not in entry:
        raise KustomizeError(f"{root}: images entry {entry!r}: needs name; "
                             f"{', '.join(unknown)} not supported")
    for resource in resources:
        for spec in pod_specs(resource.obj):
            for container in (*spec.get("initContainers", ()), *spec.get("containers", ())):
                name, tag, digest = split_image(container.get("image", ""))
                if name != entry["name"]:
                    continue
                name = entry.get("newName", name)
                if "digest" in entry:
                    container["image"] = f"{name}@{entry['digest']}"
                elif "newTag" in entry:
                    container["image"] = f"{name}:{entry['newTag']}"
                else:
                    container["image"] = name + (f"@{digest}" if digest else
                                                 f":{tag}" if tag else "")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/a/b:tag@sha256:x' -> ('reg:5000/a/b', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    restrictor = "none" if argv[1:] == ["--load-restrictor", "none"] else "rootOnly"
    try:
        print(dump(render(argv[0], load_restrictor=restrictor)), end="")
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
