"""Checks of deploy/*.yaml that the Kubernetes schemas cannot make, for `cargo xtask test`.

Run by xtask/src/deploy.rs with the Python of the validator's venv (which has PyYAML):

    deploy.py lint FILE...          one set of manifests, checked together; exit 1 on errors
    deploy.py extract FILE NAME DIR  write ConfigMap NAME's `*.yaml`/`*.yml` keys into DIR
    deploy.py crs CRDS FILE...      validate the custom objects of FILEs against the schemas of
                                    the CustomResourceDefinitions in CRDS; exit 1 on errors

`lint` prints one `error: FILE: what` line per problem:
- a duplicate key in a mapping (PyYAML keeps the last one silently; the API server refuses
  the object),
- a DaemonSet/Deployment whose selector does not match its pod template's labels,
- a volumeMount naming no volume of its pod,
- a ConfigMap volume, a ServiceAccount or a Namespace that no manifest of the set defines,
- a (Cluster)RoleBinding whose role or ServiceAccount subject no manifest of the set defines.

`crs` checks each object whose kind a CRD defines against that CRD's openAPIV3Schema with
jsonschema, as the API server would with strict field validation: an unknown field is an
error (every object schema with `properties` is closed). The `x-kubernetes-validations` (CEL)
rules are not evaluated here; the kube-api test step runs them in a real API server.
"""

import os
import sys

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "duplicate key %r" % (key,),
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=UniqueKeyLoader) if doc]


def pod_template(obj):
    if obj.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"):
        return (obj.get("spec") or {}).get("template") or {}
    return None


def lint(paths):
    errors = []
    objects = []
    for path in paths:
        try:
            objects.extend((path, obj) for obj in load(path))
        except yaml.YAMLError as e:
            errors.append("%s: %s" % (path, " ".join(str(e).split())))
    defined = {(obj.get("kind"), (obj.get("metadata") or {}).get("namespace"),
                (obj.get("metadata") or {}).get("name")) for _, obj in objects}

    def need(path, what, kind, namespace, name):
        if (kind, namespace, name) not in defined:
            full = name if namespace is None else "%s/%s" % (namespace, name)
            errors.append("%s: %s refers to %s %s, which no manifest defines"
                          % (path, what, kind, full))

    for path, obj in objects:
        meta = obj.get("metadata") or {}
        what = "%s/%s" % (obj.get("kind"), meta.get("name"))
        namespace = meta.get("namespace")
        if namespace not in (None, "default"):
            need(path, what, "Namespace", None, namespace)
        template = pod_template(obj)
        if template is None:
            continue
        labels = (template.get("metadata") or {}).get("labels") or {}
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        for key, value in selector.items():
            if labels.get(key) != value:
                errors.append("%s: %s: selector %s=%s does not match the pod template's labels"
                              % (path, what, key, value))
        pod = template.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    errors.append("%s: %s: container %s mounts %r, but the pod has no volume "
                                  "of that name" % (path, what, container.get("name"),
                                                    mount.get("name")))
        for volume in volumes.values():
            if "configMap" in volume:
                need(path, what, "ConfigMap", namespace, volume["configMap"].get("name"))
        account = pod.get("serviceAccountName")
        if account not in (None, "default"):
            need(path, what, "ServiceAccount", namespace, account)

    for path, obj in objects:
        if obj.get("kind") not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        meta = obj.get("metadata") or {}
        what = "%s/%s" % (obj.get("kind"), meta.get("name"))
        ref = obj.get("roleRef") or {}
        role_namespace = None if ref.get("kind") == "ClusterRole" else meta.get("namespace")
        need(path, what, ref.get("kind"), role_namespace, ref.get("name"))
        for subject in obj.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                need(path, what, "ServiceAccount", subject.get("namespace"), subject.get("name"))

    for error in errors:
        print("error: %s" % error)
    if not errors:
        print("ok: %d objects in %d files" % (len(objects), len(paths)))
    return 1 if errors else 0


def extract(path, name, directory):
    maps = [obj for obj in load(path)
            if obj.get("kind") == "ConfigMap" and (obj.get("metadata") or {}).get("name") == name]
    if len(maps) != 1:
        print("error: %s: expected one ConfigMap %s, found %d" % (path, name, len(maps)))
        return 1
    written = 0
    for key, value in sorted((maps[0].get("data") or {}).items()):
        if not key.endswith((".yaml", ".yml")):
            continue
        if os.path.basename(key) != key or key.startswith("."):
            print("error: %s: ConfigMap %s: key %r is not a plain file name" % (path, name, key))
            return 1
        with open(os.path.join(directory, key), "w", encoding="utf-8") as f:
            f.write(value)
        print(key)
        written += 1
    if not written:
        print("error: %s: ConfigMap %s has no *.yaml or *.yml key" % (path, name))
        return 1
    return 0


def closed(schema):
    """`schema` with every object schema that lists properties closed to other fields."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def crs(crd_path, paths):
    import jsonschema

    schemas = {}
    for crd in load(crd_path):
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd.get("spec") or {}
        for version in spec.get("versions") or []:
            api_version = "%s/%s" % (spec.get("group"), version.get("name"))
            schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or {}
            kind = (spec.get("names") or {}).get("kind")
            schemas[(api_version, kind)] = closed(schema)
    errors = []
    checked = 0
    for path in paths:
        try:
            objects = load(path)
        except yaml.YAMLError as e:
            errors.append("%s: %s" % (path, " ".join(str(e).split())))
            continue
        for obj in objects:
            key = (obj.get("apiVersion"), obj.get("kind"))
            name = (obj.get("metadata") or {}).get("name")
            if key not in schemas:
                errors.append("%s: %s/%s: no CRD in %s defines apiVersion %s kind %s"
                              % (path, obj.get("kind"), name, crd_path, key[0], key[1]))
                continue
            validator = jsonschema.Draft7Validator(schemas[key])
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                field = ".".join(str(p) for p in error.path) or "(object)"
                errors.append("%s: %s/%s: %s: %s" % (path, obj.get("kind"), name, field,
                                                     error.message))
            checked += 1
    for error in errors:
        print("error: %s" % error)
    if not errors:
        print("ok: %d custom objects in %d files match %s" % (checked, len(paths), crd_path))
    return 1 if errors else 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "lint":
        return lint(argv[1:])
    if len(argv) >= 3 and argv[0] == "crs":
        return crs(argv[1], argv[2:])
    if len(argv) == 4 and argv[0] == "extract":
        return extract(*argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
