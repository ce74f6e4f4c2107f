-- Argo CD health of a LlamaFineTune (llamaops.io/v1alpha1). Argo CD sets `obj`; we return {status, message}.
-- A run is Progressing while it waits, queues and trains, Healthy once its adapter is saved, Degraded when it
-- failed, and Suspended while spec.suspend holds it. Lua 5.1 (gopher-lua), base and string libraries only.
local hs = {}

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function message_of(status, type_, fallback)
  local c = condition(status, type_)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
local spec = obj.spec or {}
local phase = nil
if status ~= nil then
  phase = status.phase
end

if phase == "Suspended" or spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "suspended (spec.suspend): no pods, checkpoints kept"
  return hs
end

if phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "the operator has not handled the latest spec yet"
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.adapter ~= nil and status.adapter.uri ~= nil then
    hs.message = "adapter at " .. status.adapter.uri
  else
    hs.message = "training succeeded"
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, "Failed", "training failed")
  return hs
end

if phase == "Pending" then
  hs.status = "Progressing"
  hs.message = "validating"
  return hs
end

if phase == "Queued" then
  hs.status = "Progressing"
  hs.message = "queued: " .. message_of(status, "Queued", "waiting for GPUs")
  return hs
end

if phase == "Admitted" then
  hs.status = "Progressing"
  hs.message = message_of(status, "Admitted", "admitted, starting")
  return hs
end

if phase == "Running" then
  hs.status = "Progressing"
  local p = status.progress
  if p ~= nil and p.display ~= nil then
    hs.message = "training: step " .. p.display
    if p.loss ~= nil then
      hs.message = hs.message .. ", loss " .. string.format("%.4g", p.loss)
    end
  else
    hs.message = "training"
  end
  return hs
end

hs.status = "Unknown"
hs.message = "unknown phase " .. tostring(phase)
return hs
