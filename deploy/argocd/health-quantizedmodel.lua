-- Argo CD health check for kubequant.io/QuantizedModel (Lua 5.1).
-- Uses no standard library (Argo CD opens none by default), only the base functions.
--   Progressing: no status yet, the status is older than the spec (observedGeneration < generation),
--                or phase Pending, Quantizing, Evaluating or Deploying
--   Degraded:    phase Failed or GateFailed, with the operator's message
--   Healthy:     phase Ready
local hs = {}

local function describe(status, fallback)
  if status.message ~= nil and status.message ~= "" then
    return status.phase .. ": " .. tostring(status.message)
  end
  return status.phase .. ": " .. fallback
end

local status = obj.status
if status == nil or status.phase == nil or status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubequant operator to reconcile this model"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "The operator has not yet reconciled generation " .. tostring(generation)
    .. " of the spec (last " .. tostring(status.observedGeneration or "none") .. ")"
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = describe(status, "serving the quantized model")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status, "the operator reported a failure")
elseif phase == "GateFailed" then
  hs.status = "Degraded"
  hs.message = describe(status, "the quantized model failed the perplexity gate; the last model that passed keeps serving")
elseif phase == "Pending" or phase == "Quantizing" or phase == "Evaluating" or phase == "Deploying" then
  hs.status = "Progressing"
  hs.message = describe(status, "in progress")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
