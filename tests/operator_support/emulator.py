"""kmock 0.8's KubernetesEmulator with the gaps that stall kopf closed (see shared notes k8s-testing.md).

1. Objects get uid, resourceVersion, creationTimestamp, generation and namespace; every write bumps
   a global resourceVersion, a change outside metadata/status bumps generation, a no-op writes nothing.
2. A failed JSON-patch `test` (kopf's optimistic lock on resourceVersion) answers 422, not 500.
3. Lists carry the real resourceVersion; a watch from ?resourceVersion=N replays what happened after N.
4. The snapshot (or replay) and the live subscription are taken under one lock: no event falls between.
5. Live events carry metadata.namespace, so namespaced watches see them.
Also: the status subresource (PATCH .../status changes only status, a main PATCH never does), equality
label selectors, and garbage collection through ownerReferences (Background), which kopf's
finalizers and our retention tests rely on.

Pins kmock==0.8: it overrides internals (_handle, _serve_list, _serve_watch).
"""

from __future__ import annotations

import collections
import copy
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts as kdicts
from kmock._internal import enums, rendering

Key = tuple[Any, str | None, str]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selected(obj: dict, selector: str | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _essence(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _revision: int = attrs.field(default=0, init=False)
    _log: dict = attrs.field(factory=lambda: collections.defaultdict(list), init=False)
    _created: dict = attrs.field(factory=dict, init=False)  # request id -> what it created (generateName)

    # ---- the store: used by HTTP requests and directly by the tests (which play the controllers) ----

    async def _emit(self, resource: Any, kind: str, raw: dict) -> None:
        event = {"type": kind, "object": copy.deepcopy(raw)}
        self._log[resource].append((self._revision, event))
        await self._buses[resource].put(event)

    def _next(self) -> str:
        self._revision += 1
        return str(self._revision)

    async def _store_create(self, resource: Any, namespace: str | None, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if namespace:
            meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (resource, meta.get("namespace"), meta.get("name"))
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{resource.plural} \"{meta.get('name')}\" already exists")
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next(), creationTimestamp=_now(), generation=1)
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        await self._emit(resource, "ADDED", obj)
        return obj

    async def _store_patch(self, resource: Any, namespace: str | None, name: str, patch: Any,
                           subresource: str | None = None) -> dict:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        before = copy.deepcopy(self._objects[key].raw)
        if isinstance(patch, dict):
            # The status subresource changes only status; the main resource never does.
            patch = {"status": patch.get("status")} if subresource == "status" else \
                {k: v for k, v in patch.items() if k != "status"}
        try:
            after = copy.deepcopy(kdicts.patch_dict(before, patch))
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        if after == before:
            return before  # a no-op: no new resourceVersion, no event (as the apiserver does)
        meta = after.setdefault("metadata", {})
        meta["resourceVersion"] = self._next()
        if _essence(after) != _essence(before):
            meta["generation"] = int(before["metadata"].get("generation") or 1) + 1
        self._objects[key].history.append(after)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(key)
        else:
            await self._emit(resource, "MODIFIED", after)
        return after

    async def _store_delete(self, resource: Any, namespace: str | None, name: str) -> dict:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = self._objects[key].raw
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return obj
        if meta.get("finalizers"):
            return await self._store_patch(resource, namespace, name, {"metadata": {"deletionTimestamp": _now()}})
        await self._remove(key)
        return obj

    async def _remove(self, key: Key) -> None:
        obj = self._objects[key]
        raw = copy.deepcopy(obj.raw)
        raw["metadata"]["resourceVersion"] = self._next()
        obj.delete()
        await self._emit(key[0], "DELETED", raw)
        # Garbage collection (background propagation): dependents go after their owner.
        uid = raw["metadata"].get("uid")
        for other_key, other in list(self._objects.items()):
            if other.deleted or other_key[1] != key[1]:
                continue
            refs = (other.raw.get("metadata") or {}).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                await self._store_delete(*other_key)

    async def store_create(self, resource: Any, obj: dict) -> dict:
        async with self._lock:
            return await self._store_create(kmock.resource(resource), obj["metadata"].get("namespace"), obj)

    async def store_patch(self, resource: Any, namespace: str, name: str, patch: Any,
                          subresource: str | None = None) -> dict:
        async with self._lock:
            return await self._store_patch(kmock.resource(resource), namespace, name, patch, subresource)

    async def store_delete(self, resource: Any, namespace: str, name: str) -> None:
        async with self._lock:
            await self._store_delete(kmock.resource(resource), namespace, name)

    def store_get(self, resource: Any, namespace: str, name: str) -> dict | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def store_list(self, resource: Any, namespace: str | None = None) -> list[dict]:
        res = kmock.resource(resource)
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in self._objects.items()
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

    # ---- HTTP ----

    async def _handle(self, request: rendering.Request):
        if request.resource is not None:
            async with self._lock:
                if request.action == enums.action.CREATE:
                    self._created[id(request)] = await self._store_create(request.resource, request.namespace,
                                                                          request.data)
                elif request.action == enums.action.UPDATE and request.name is not None:
                    await self._store_patch(request.resource, request.namespace, request.name, request.data,
                                            request.subresource)
                elif request.action == enums.action.DELETE and request.name is not None:
                    await self._store_delete(request.resource, request.namespace, request.name)
        # The answers come from kmock's own fallbacks, which read the store (skip its state handling).
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _serve_create(self, request: rendering.Request) -> dict:
        # Never None: kmock disables a reaction for good once it answers nothing.
        return self._created.pop(id(request))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        selector = request.params.get("labelSelector")
        async with self._lock:
            items = [copy.deepcopy(obj.raw) for (res, ns, _), obj in self._objects.items()
                     if res == request.resource and not obj.deleted
                     and (request.namespace is None or ns == request.namespace) and _selected(obj.raw, selector)]
            revision = str(self._revision)
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": revision}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # send the headers now
        resource = request.resource
        since = request.params.get("resourceVersion")
        selector = request.params.get("labelSelector")

        def wanted(event: dict) -> bool:
            meta = event["object"].get("metadata") or {}
            return ((request.namespace is None or meta.get("namespace") == request.namespace)
                    and (request.name is None or meta.get("name") == request.name)
                    and _selected(event["object"], selector))

        bus = self._buses[resource]
        async with self._lock:
            if since and since != "0":
                backlog = [event for revision, event in self._log[resource] if revision > int(since)]
            else:
                backlog = [{"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                           for (res, _, _), obj in self._objects.items() if res == resource and not obj.deleted]
            marker = await bus.mark()
        try:
            for event in backlog:
                if wanted(event):
                    yield event
            async for event in bus.stream(since=marker):
                if wanted(event):
                    yield event
        finally:
            await bus.unmark(marker)
