-- Prepended to every script: Redis's clock and state-list membership.
-- States come from the Python transition table as comma-separated ARGV, never literals.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function is_one_of(csv, value)
  return value ~= nil and value ~= false
    and string.find(',' .. csv .. ',', ',' .. value .. ',', 1, true) ~= nil
end
