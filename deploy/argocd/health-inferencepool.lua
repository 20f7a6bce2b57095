-- Argo CD health check for inference.networking.k8s.io/InferencePool (Lua 5.1): Healthy when every
-- gateway that references the pool accepted it and resolved its endpoint picker.
local hs = {status = "Progressing", message = "no gateway references the pool yet"}
local parents = (obj.status or {}).parents
if parents == nil or #parents == 0 then
  return hs
end
for _, parent in ipairs(parents) do
  local accepted, resolved = nil, nil
  for _, condition in ipairs(parent.conditions or {}) do
    if condition.type == "Accepted" then accepted = condition end
    if condition.type == "ResolvedRefs" then resolved = condition end
  end
  for _, condition in ipairs({accepted, resolved}) do
    if condition ~= nil and condition.status == "False" then
      hs.status = "Degraded"
      hs.message = (condition.reason or condition.type) .. ": " .. (condition.message or "")
      return hs
    end
  end
  if accepted == nil or resolved == nil then
    hs.message = "waiting for the gateway to accept the pool"
    return hs
  end
end
hs.status = "Healthy"
hs.message = "accepted by " .. #parents .. " gateway(s)"
return hs
