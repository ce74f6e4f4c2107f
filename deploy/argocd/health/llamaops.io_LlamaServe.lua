-- Argo CD health of a LlamaServe (llamaops.io/v1alpha1). Argo CD sets `obj`; we return {status, message}.
-- Healthy when Ready (every replica serves every adapter), Progressing while it waits for its adapters'
-- fine-tunes or rolls out, Degraded when it lost replicas or failed. Lua 5.1 (gopher-lua), base and string only.
local hs = {}

local function message_of(status, fallback)
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.status ~= "True" and c.message ~= nil and c.message ~= "" then
        return c.message
      end
    end
  end
  return fallback
end

local function replicas(status)
  local ready = status.readyReplicas or 0
  local want = status.replicas or 0
  return string.format("%d/%d replicas ready", ready, want)
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

local phase = status.phase
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "the operator has not handled the latest spec yet"
  return hs
end

if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = replicas(status)
  if status.endpoint ~= nil then
    hs.message = hs.message .. " at " .. status.endpoint
  end
  return hs
end

if phase == "WaitingForAdapters" then
  hs.status = "Progressing"
  hs.message = message_of(status, "waiting for the adapters' fine-tunes to succeed")
  return hs
end

if phase == "Deploying" or phase == "Pending" then
  hs.status = "Progressing"
  hs.message = "deploying: " .. replicas(status)
  return hs
end

if phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, string.lower(phase) .. ": " .. replicas(status))
  return hs
end

hs.status = "Unknown"
hs.message = "unknown phase " .. tostring(phase)
return hs
