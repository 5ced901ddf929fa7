-- Argo CD health check for imagebatch.dev/ImageBatch.
--
-- Argo CD has no health check for custom resources it does not know: without this one
-- a failed batch shows as Healthy. The operator keeps kstatus-style conditions:
--   Ready=True    -> Healthy      (Succeeded, possibly with failures under the limit)
--   Stalled=True  -> Degraded     (Failed: invalid CSV, too many failed images, ...)
--   anything else -> Progressing  (Pending, Validating, Running; or no status yet)
-- A status written for an older spec (status.observedGeneration below
-- metadata.generation) is Progressing too: the new spec has not been looked at yet.
local hs = {status = "Progressing", message = "Waiting for the operator to report a status"}

if obj.status == nil then
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
local stalled = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Stalled" then
      stalled = condition
    end
  end
end

local function describe(condition)
  local phase = obj.status.phase or ""
  local text = condition.message or condition.reason or ""
  if phase ~= "" and text ~= "" then
    return phase .. ": " .. text
  end
  return phase .. text
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
elseif ready ~= nil then
  hs.message = describe(ready)
end
return hs
