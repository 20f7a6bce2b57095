-- Argo CD health check for leaderworkerset.x-k8s.io/LeaderWorkerSet (Lua 5.1): the serving groups of
-- a QuantizedModel with serving.nodes > 1. Healthy once every group is updated and ready.
local hs = {status = "Progressing", message = "waiting for the LeaderWorkerSet controller"}
local meta = obj.metadata or {}
local status = obj.status
if status == nil then
  return hs
end
if (status.observedGeneration or 0) < (meta.generation or 0) then
  hs.message = "the controller has not seen the latest spec yet"
  return hs
end
local wanted = (obj.spec or {}).replicas or 1
local ready, updated = status.readyReplicas or 0, status.updatedReplicas or 0
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Available" and condition.status == "True" and ready >= wanted and updated >= wanted then
      hs.status = "Healthy"
      hs.message = ready .. "/" .. wanted .. " groups ready"
      return hs
    end
  end
end
hs.message = updated .. "/" .. wanted .. " groups updated, " .. ready .. " ready"
return hs
