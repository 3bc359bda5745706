-- Whether a step message's commands are the job's as the farm sends them (claim.lua):
-- its step's command must be the record's, and it must carry the rest of the job's steps,
-- each with the record's command.
-- job: the job hash    history: the job's history (its first line holds the commands)
-- step: the message's step (0-based)   sent: the message's commands from its step on (JSON)
-- Returns why not (text), or false; false too when the record's commands cannot be read
-- or have no such step (the claim says why then).
local function decoded(text)
  if not text then return nil end
  local ok, value = pcall(cjson.decode, text)
  if ok and type(value) == 'table' then return value end
  return nil
end
local function record_commands(job, history)
  if redis.call('TYPE', history).ok == 'string' then
    local first = decoded(string.match(redis.call('GET', history), '^[^\n]*'))
    return first and first.c
  end
  return decoded(redis.call('HGET', job, 'commands'))  -- a record from before the history
end
local function same_argv(a, b)
  if type(a) ~= 'table' or type(b) ~= 'table' or #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end
local function not_sent(job, history, step, sent)
  local commands = record_commands(job, history)
  if type(commands) ~= 'table' or step < 0 or step >= #commands then return false end
  local message = decoded(sent)
  if not message then return 'its commands cannot be read' end
  if not same_argv(commands[step + 1], message[1]) then
    return "its command is not the job record's (a forged or altered message?); the " ..
      "node runs only the record's"
  end
  if #message ~= #commands - step then return "it does not carry the job's remaining steps" end
  for i = 2, #message do
    if not same_argv(commands[step + i], message[i]) then
      return "its chain's step " .. (step + i) .. " is not the job's"
    end
  end
  return false
end
